//! openraft glue: the type configuration, the peer network, and [`Registry`],
//! the handle through which MUPDATE sessions write and read.
//!
//! Every write goes through Raft, even on a single node, so that the log is
//! the registry's event log and a single node can later grow into a cluster.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use openraft::error::{
    ChangeMembershipError, ClientWriteError, LinearizableReadError, NetworkError, RPCError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::ChangeMembers;
use openraft::Instant as _;
use openraft::{BasicNode, Config, RaftNetworkV2, ReadPolicy, ServerState};
use thiserror::Error;

use crate::coalesce::Coalescer;
use crate::model::{ClientTag, MailboxEntry, Outcome, Proposal, RegistryCommand};
use crate::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerError, PeerPool, PeerRequest,
    PeerResponse,
};
use crate::store::{LogStore, SnapshotData, StateMachine, Store};
use crate::tls::PeerTls;

openraft::declare_raft_types!(
    /// Corvid's Raft types: log entries carry registry commands (with their
    /// client tag and the leader's stamp) and answer with their outcome.
    pub TypeConfig:
        D = Proposal,
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
    /// Address the peer protocol (Raft, forwarded writes, administration)
    /// listens on.
    pub peer_listen: std::net::SocketAddr,
    /// Address other nodes use to reach this one (default: `peer_listen`).
    pub peer_advertise: Option<String>,
    /// On first start, make this node a one-node cluster. Turn off on nodes
    /// that will join an existing cluster (`corvidctl cluster add-learner`)
    /// or be part of a `corvidctl cluster init`.
    pub bootstrap: bool,
    /// `linearizable` (default): FIND/LIST/UPDATE on any node reflect every
    /// write acknowledged before them (ReadIndex through the leader).
    /// `local`: answer from this node's state without asking the leader:
    /// faster, and served without quorum, but possibly stale.
    pub read_consistency: ReadConsistency,
    /// With `read_consistency = "linearizable"`: the leader answers a read
    /// index from its lease (openraft's `LeaseRead`) instead of a round to
    /// a quorum, while a quorum acknowledged it less than
    /// `election_timeout_max_ms` ago. Off by default. Safe only while every
    /// node's monotonic clock runs at about the same rate (see the read
    /// section of docs/src/cluster.md); set it on every node or none.
    pub lease_reads: bool,
    /// Mutual TLS on the peer port: this node's PEM certificate (signed by
    /// `peer_tls_ca`). Set all three or none.
    pub peer_tls_cert: Option<std::path::PathBuf>,
    /// This node's PEM private key.
    pub peer_tls_key: Option<std::path::PathBuf>,
    /// The PEM CA that signs every node's certificate.
    pub peer_tls_ca: Option<std::path::PathBuf>,
    /// TEST ONLY, BREAKS SAFETY: every node answers reads from its own state
    /// at once, without a read index and even while it knows no leader, so
    /// a deposed leader or a partitioned follower serves stale data. Exists
    /// so that the Jepsen harness can show it detects the anomaly.
    pub unsafe_test_stale_reads: bool,
    /// TEST ONLY, BREAKS SAFETY: the leader answers reads from its own
    /// state without confirming that it still leads (no read index), while
    /// followers stay linearizable. Stale only when a deposed leader is cut
    /// off from the new one: the Jepsen harness's partitions must catch it.
    pub unsafe_test_leader_local_reads: bool,
    /// TEST ONLY, BREAKS DURABILITY: log appends are acknowledged to Raft
    /// before (in fact without) the WAL fsync, so a power loss on a
    /// majority loses acknowledged writes. Only the Jepsen harness's
    /// power-loss fault can catch it.
    pub unsafe_test_ack_before_fsync: bool,
    /// TEST ONLY: the log stream pauses this many milliseconds before each
    /// snapshot chunk it sends to a replica (0, the default: no pause), so
    /// that tests can stop a master deterministically in the middle of a
    /// snapshot transfer. Slows every replica's snapshot on this node.
    pub unsafe_test_stream_frame_delay_ms: u64,
    /// Most concurrent connections to the peer port; more are closed at
    /// once.
    pub max_peer_connections: usize,
    /// Let a master listen for peers on a non-loopback address without
    /// peer mutual TLS (anyone who reaches the port can then act as a
    /// cluster member). Off by default; a warning is logged at every start.
    pub allow_insecure_peer: bool,
}

/// How reads are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadConsistency {
    /// Confirm with the leader's read index first.
    Linearizable,
    /// Read the local state as it is.
    Local,
}

impl RaftSettings {
    /// Mutual TLS for the peer port (server and client sides), when the
    /// three `peer_tls_*` keys are set; an error when only some are.
    pub fn peer_tls(&self) -> anyhow::Result<Option<PeerTls>> {
        match (&self.peer_tls_cert, &self.peer_tls_key, &self.peer_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::tls::peer_tls(cert, key, ca)?)),
            (None, None, None) => Ok(None),
            _ => anyhow::bail!("[raft] peer_tls_cert, peer_tls_key and peer_tls_ca go together"),
        }
    }
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
            peer_listen: "127.0.0.1:3906".parse().expect("valid default address"),
            peer_advertise: None,
            bootstrap: true,
            read_consistency: ReadConsistency::Linearizable,
            lease_reads: false,
            peer_tls_cert: None,
            peer_tls_key: None,
            peer_tls_ca: None,
            unsafe_test_stale_reads: false,
            unsafe_test_leader_local_reads: false,
            unsafe_test_ack_before_fsync: false,
            unsafe_test_stream_frame_delay_ms: 0,
            max_peer_connections: 128,
            allow_insecure_peer: false,
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
    /// This node was removed from the cluster (or never joined one).
    #[error("{NOT_A_MEMBER}")]
    NotMember,
    /// A replica that never completed its first sync holds no state.
    #[error("{SYNCHRONISING}")]
    Synchronising,
}

/// What a node outside the cluster's membership answers.
pub const NOT_A_MEMBER: &str = "this node is not a member of the registry cluster";
/// What a replica without a complete state answers.
pub const SYNCHRONISING: &str = "replica is synchronising";
/// Why a write or read fails fast on a node that knows no leader.
pub const NO_LEADER: &str = "no leader";
/// Why a write fails that was sent towards a leader that then went away.
pub const NO_LEADER_MAYBE_APPLIED: &str = "no leader; the write may still be applied";

/// The leader's wall clock, stamped into each proposal it appends.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running registry node: Raft plus its RocksDB store.
#[derive(Clone)]
pub struct Registry {
    raft: Raft,
    store: Store,
    write_timeout: Duration,
    read_consistency: ReadConsistency,
    unsafe_stale_reads: bool,
    unsafe_leader_local_reads: bool,
    /// Leader read indexes from the lease (see [`RaftSettings::lease_reads`]).
    lease_reads: bool,
    /// Set once the state machine has caught up with what was committed
    /// before a restart; local reads wait for it.
    recovered: Arc<AtomicBool>,
    peers: PeerPool,
    read_batches: Arc<ReadQueue>,
    /// Writes on their way to the leader, by its address.
    forwarders: Arc<Mutex<HashMap<String, Arc<ForwardQueue>>>>,
    peer_tls: Option<PeerTls>,
    /// A request fails with "no leader" once no leader was known for this
    /// long (about one election).
    leaderless_grace: Duration,
    /// Last time a leader was known fresh (see [`Registry::leader_is_fresh`]).
    leader_contact: Arc<Mutex<Option<Instant>>>,
    /// When this node started (its leader contact age before any contact).
    started_at: Instant,
    /// A fresh leader's membership no longer lists this node.
    removed: Arc<AtomicBool>,
    /// When the membership was last probed (see `probe_membership`).
    membership_probe: Arc<Mutex<Option<Instant>>>,
    /// TEST ONLY: pause of the log stream before each snapshot chunk (see
    /// [`RaftSettings::unsafe_test_stream_frame_delay_ms`]).
    stream_frame_delay: Duration,
}

/// Readers waiting for a read index: one request is in flight at a time,
/// and readers arriving meanwhile share the next one (an answer may only
/// serve readers that arrived before it was asked for).
type ReadQueue = Coalescer<(), Result<u64, ReadIndexFailure>>;

/// Why a batch of readers got no read index.
#[derive(Debug, Clone)]
enum ReadIndexFailure {
    /// This node lost its fresh leader while asking: answered at once.
    NoLeader,
    /// Worth another try (the leader changed, a timeout, ...).
    Retry(String),
}

/// How often to look again for a leader while none is known.
const LEADER_POLL: Duration = Duration::from_millis(20);

impl Registry {
    /// Opens the store under `data_dir` and starts Raft. With
    /// `settings.bootstrap`, a node that was never initialized makes itself
    /// a one-node cluster whose member address is `addr` (its peer address).
    pub async fn start(
        data_dir: &Path,
        settings: &RaftSettings,
        addr: &str,
    ) -> anyhow::Result<Registry> {
        let peer_tls = settings.peer_tls()?;
        let client_tls = peer_tls.as_ref().map(|t| t.client.clone());
        if settings.lease_reads {
            // A leader's lease holds because its followers refuse to vote
            // for a lease after they last heard from it; a node that
            // restarted forgot when that was, so it keeps out of elections
            // for one lease first.
            tokio::time::sleep(Duration::from_millis(settings.election_timeout_max_ms)).await;
        }
        let store = Store::open(data_dir)?;
        let peers = PeerPool::new(client_tls.clone());
        let config = Config {
            cluster_name: "corvid".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
                settings.snapshot_after_entries,
            ),
            max_in_snapshot_log_to_keep: settings.keep_log_entries,
            install_snapshot_timeout: 60_000,
            // A node that rejoins with a stale log would otherwise bump the
            // term with elections it cannot win and delay failover.
            enable_pre_vote: Some(true),
            // A restarted leader rejoins as a follower instead of believing
            // in its old term until someone tells it otherwise.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(
            settings.node_id,
            Arc::new(config),
            Network {
                tls: client_tls.clone(),
                pool: peers.clone(),
                chunk_delay: Duration::from_millis(settings.unsafe_test_stream_frame_delay_ms),
            },
            LogStore::new(store.clone())
                .with_unsafe_ack_before_fsync(settings.unsafe_test_ack_before_fsync),
            StateMachine::new(store.clone()),
        )
        .await?;
        if settings.bootstrap && !raft.is_initialized().await? {
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
        let registry = Registry {
            raft,
            store,
            write_timeout: Duration::from_millis(settings.write_timeout_ms),
            read_consistency: settings.read_consistency,
            unsafe_stale_reads: settings.unsafe_test_stale_reads,
            unsafe_leader_local_reads: settings.unsafe_test_leader_local_reads,
            lease_reads: settings.lease_reads,
            recovered: Arc::new(AtomicBool::new(false)),
            peers,
            read_batches: Coalescer::new(1, usize::MAX),
            forwarders: Arc::default(),
            peer_tls,
            leaderless_grace: Duration::from_millis(settings.election_timeout_max_ms * 2),
            leader_contact: Arc::default(),
            started_at: Instant::now(),
            removed: Arc::default(),
            membership_probe: Arc::default(),
            stream_frame_delay: Duration::from_millis(settings.unsafe_test_stream_frame_delay_ms),
        };
        if settings.unsafe_test_stale_reads {
            tracing::error!(
                "unsafe_test_stale_reads is on: reads may be stale; never use this outside tests"
            );
        }
        if settings.unsafe_test_leader_local_reads {
            tracing::error!(
                "unsafe_test_leader_local_reads is on: a deposed leader may serve stale reads; never use this outside tests"
            );
        }
        if settings.unsafe_test_ack_before_fsync {
            tracing::error!(
                "unsafe_test_ack_before_fsync is on: acknowledged writes are lost on power loss; never use this outside tests"
            );
        }
        if settings.unsafe_test_stream_frame_delay_ms > 0 {
            tracing::error!(
                delay_ms = settings.unsafe_test_stream_frame_delay_ms,
                "unsafe_test_stream_frame_delay_ms is on: snapshots sent from this node are slowed on purpose; never use this outside tests"
            );
        }
        registry.spawn_recovery();
        registry.spawn_metrics();
        crate::metrics::register_snapshot_counters();
        Ok(registry)
    }

    /// Waits (in the background) until the state machine holds everything
    /// committed before a restart. On a node that lost quorum this waits
    /// until quorum returns; until then only linearizable reads (which
    /// need the leader anyway) are served.
    fn spawn_recovery(&self) {
        let raft = self.raft.clone();
        let recovered = self.recovered.clone();
        tokio::spawn(async move {
            loop {
                let initialized = raft.is_initialized().await.unwrap_or(false);
                if !initialized {
                    // Nothing to recover yet; check again after joining.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                match raft.wait_for_recovery(Some(Duration::from_secs(5))).await {
                    Ok(_) => {
                        recovered.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => tracing::debug!("still recovering: {e}"),
                }
            }
        });
    }

    /// The TLS configuration for accepting peers, when mutual TLS is on.
    pub fn peer_server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.peer_tls.as_ref().map(|t| t.server.clone())
    }

    /// The local store (for scans and UPDATE subscriptions).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// TEST ONLY: how long the log stream pauses before each snapshot chunk
    /// (zero unless `unsafe_test_stream_frame_delay_ms` is set).
    pub fn stream_frame_delay(&self) -> Duration {
        self.stream_frame_delay
    }

    /// The Raft node.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The peer address of the current leader, if one is known.
    fn leader_addr(err: &impl LeaderHint) -> Option<String> {
        err.leader_addr()
    }

    /// Commits `command` as the only request of a one-off client session
    /// (see [`Registry::write_as`]).
    pub async fn write(&self, command: RegistryCommand) -> Result<Outcome, RegistryError> {
        self.write_as(ClientTag::once(), command).await
    }

    /// Commits `command`, request `client` of its session, through Raft and
    /// returns its outcome once applied. On a follower the write is
    /// forwarded to the leader; while there is no leader it waits about one
    /// election for one, then answers "no leader".
    ///
    /// Every attempt carries the same `client` tag, and the state machine
    /// answers a tag it has seen with the stored outcome: retrying after an
    /// ambiguous failure (a `ForwardToLeader` for an entry that was in fact
    /// appended, a lost answer from the leader) never applies a write twice.
    pub async fn write_as(
        &self,
        client: ClientTag,
        command: RegistryCommand,
    ) -> Result<Outcome, RegistryError> {
        let started = Instant::now();
        let out = self
            .write_inner(client, command, started + self.write_timeout)
            .await;
        metrics::histogram!("corvid_raft_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        out
    }

    async fn write_inner(
        &self,
        client: ClientTag,
        command: RegistryCommand,
        deadline: Instant,
    ) -> Result<Outcome, RegistryError> {
        let started = Instant::now();
        let mut proposal = Proposal {
            client: Some(client),
            stamp_ms: 0,
            command,
        };
        loop {
            self.check_member()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RegistryError::Timeout(self.write_timeout));
            }
            if !self.leader_is_fresh() {
                self.wait_for_leader(started, remaining).await?;
                continue;
            }
            // A follower that knows another node leads forwards at once:
            // asking its own Raft core first would only cost a round trip
            // through the core to be told the same.
            let addr = match self.other_leader_addr() {
                Some(addr) => addr,
                None => {
                    proposal.stamp_ms = now_ms();
                    let write =
                        tokio::time::timeout(remaining, self.raft.client_write(proposal.clone()));
                    let err = match self.while_leader_fresh(write).await {
                        None => {
                            return Err(RegistryError::Unavailable(NO_LEADER_MAYBE_APPLIED.into()))
                        }
                        Some(Err(_)) => return Err(RegistryError::Timeout(self.write_timeout)),
                        Some(Ok(Ok(resp))) => return Ok(resp.data),
                        Some(Ok(Err(e))) => e,
                    };
                    // A ForwardToLeader may come for an entry this node did
                    // append (and that may commit): retrying is safe only
                    // because the state machine answers a repeated tag from
                    // its session table.
                    if err.forward_to_leader().is_none() {
                        return Err(RegistryError::Unavailable(err.to_string()));
                    }
                    let Some(addr) = Self::leader_addr(&err) else {
                        self.wait_for_leader(started, remaining).await?;
                        continue;
                    };
                    addr
                }
            };
            metrics::counter!("corvid_raft_forwarded_writes_total").increment(1);
            let forward = tokio::time::timeout(remaining, self.forward(addr, proposal.clone()));
            let Some(answer) = self.while_leader_fresh(forward).await else {
                return Err(RegistryError::Unavailable(NO_LEADER_MAYBE_APPLIED.into()));
            };
            match answer {
                Ok(Forwarded::Done(outcome)) => return Ok(outcome),
                // The leader we asked was no longer leader: ask again.
                Ok(Forwarded::NotLeader) => {
                    tokio::time::sleep(LEADER_POLL.min(remaining)).await;
                }
                Ok(Forwarded::Unexpected(m)) => return Err(RegistryError::Unavailable(m)),
                Err(_) | Ok(Forwarded::Timeout) => {
                    return Err(RegistryError::Timeout(self.write_timeout))
                }
                // Not sent, or sent and the answer lost (a leader that died
                // or restarted; a pooled connection that died idle was
                // already retried once by the pool): try again, on a
                // new leader if one is elected, until the leader is no
                // longer fresh ("no leader") or the deadline. Safe with the
                // session table: a write that did land is not applied twice.
                Ok(Forwarded::Failed(e)) => {
                    metrics::counter!("corvid_raft_forward_retries_total").increment(1);
                    tracing::debug!("forwarding to the leader failed, retrying: {e}");
                    tokio::time::sleep(LEADER_POLL.min(remaining)).await;
                }
            }
        }
    }

    /// Sends `proposal` to the leader at `addr` together with the other
    /// writes this node is forwarding there (see [`crate::coalesce`]).
    async fn forward(&self, addr: String, proposal: Proposal) -> Forwarded {
        let coalescer = {
            let Ok(mut f) = self.forwarders.lock() else {
                return Forwarded::Failed("forwarder lock poisoned".into());
            };
            f.entry(addr.clone())
                .or_insert_with(|| Coalescer::new(FORWARDS_IN_FLIGHT, MAX_FORWARD_BATCH))
                .clone()
        };
        let sender = || {
            let (peers, timeout) = (self.peers.clone(), self.write_timeout);
            move |proposals: Vec<Proposal>| {
                let (peers, addr) = (peers.clone(), addr.clone());
                async move {
                    let n = proposals.len();
                    metrics::counter!("corvid_raft_forward_batches_total").increment(1);
                    let request = PeerRequest::WriteMany(proposals);
                    let all = |f: Forwarded| vec![f; n];
                    match peers.call(&addr, &request, timeout).await {
                        Ok(PeerResponse::WriteMany(answers)) if answers.len() == n => answers
                            .into_iter()
                            .map(|a| match a {
                                Ok(outcome) => Forwarded::Done(outcome),
                                Err(m) if m == NOT_LEADER => Forwarded::NotLeader,
                                Err(m) => Forwarded::Failed(m),
                            })
                            .collect(),
                        Err(PeerError::Remote { message, .. }) if message == NOT_LEADER => {
                            all(Forwarded::NotLeader)
                        }
                        Ok(other) => all(Forwarded::Unexpected(format!(
                            "unexpected answer from leader: {other:?}"
                        ))),
                        Err(PeerError::Timeout(_)) => all(Forwarded::Timeout),
                        Err(e) => all(Forwarded::Failed(e.to_string())),
                    }
                }
            }
        };
        coalescer
            .submit(proposal, sender)
            .await
            .unwrap_or_else(|| Forwarded::Failed("forwarded batch lost".into()))
    }

    /// The peer address of the leader when this node knows that another
    /// node leads (`None` on the leader itself, or with no leader known).
    fn other_leader_addr(&self) -> Option<String> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let leader = m.current_leader.filter(|&l| l != m.id)?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some(node.addr.clone())
    }

    /// Waits a little for a leader to be elected: an error once none has
    /// been known for about one election since `started`.
    async fn wait_for_leader(
        &self,
        started: Instant,
        remaining: Duration,
    ) -> Result<(), RegistryError> {
        // Waiting helps only while an election may still be running: not
        // when this node has been without a leader for an election already.
        if started.elapsed() >= self.leaderless_grace
            || self.leader_contact_age() >= self.leaderless_grace * 2
        {
            // Perhaps removed from the cluster: the next request will say so.
            self.probe_membership();
            return Err(RegistryError::Unavailable(NO_LEADER.into()));
        }
        tokio::time::sleep(LEADER_POLL.min(remaining)).await;
        Ok(())
    }

    fn note_leader_contact(&self) {
        // A leader replicates to us: we are a member (again).
        self.removed.store(false, Ordering::Release);
        if let Ok(mut c) = self.leader_contact.lock() {
            *c = Some(Instant::now());
        }
    }

    /// Fails with [`RegistryError::NotMember`] on a node that was initialized
    /// and is not (any longer) in the membership.
    fn check_member(&self) -> Result<(), RegistryError> {
        if !self.is_member() {
            return Err(RegistryError::NotMember);
        }
        Ok(())
    }

    /// False on a node that was initialized and is not in the membership it
    /// knows, or that a fresh leader's membership no longer lists (a
    /// removed node is often never sent the entry that removes it).
    fn is_member(&self) -> bool {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let membership = m.membership_config.membership();
        let initialized = membership.nodes().next().is_some();
        let listed = !initialized || membership.get_node(&m.id).is_some();
        listed && !self.removed.load(Ordering::Acquire)
    }

    /// In the background, at most once a second: asks the other members
    /// whether their (fresh) leader's membership still lists this node.
    fn probe_membership(&self) {
        {
            let Ok(mut last) = self.membership_probe.lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (me, peers): (u64, Vec<String>) = {
            let rx = self.raft.metrics();
            let m = rx.borrow_watched();
            let peers = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != m.id)
                .map(|(_, n)| n.addr.clone())
                .collect();
            (m.id, peers)
        };
        let this = self.clone();
        tokio::spawn(async move {
            let asks = peers.iter().map(|addr| {
                let request = PeerRequest::Admin(AdminRequest::Status);
                let pool = this.peers.clone();
                async move {
                    pool.call(addr, &request, Duration::from_millis(300))
                        .await
                        .ok()
                }
            });
            for answer in futures::future::join_all(asks).await {
                if let Some(PeerResponse::Admin(AdminResponse::Status(s))) = answer {
                    if s.leader.is_some() && s.leader_fresh && !s.nodes.contains_key(&me) {
                        tracing::warn!(
                            "node {} reports a membership without this node ({me}): removed",
                            s.id
                        );
                        this.removed.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        });
    }

    /// Whether this node has heard from a leader within about one election
    /// timeout: a leader that a quorum acknowledged lately, or a follower
    /// that a leader's AppendEntries reached lately. Unlike the committed
    /// vote (which, with pre-vote, a cut-off node keeps forever), this goes
    /// false when the node is cut off.
    pub fn leader_is_fresh(&self) -> bool {
        let (is_leader, alone, known) = {
            let rx = self.raft.metrics();
            let m = rx.borrow_watched();
            (
                m.state == ServerState::Leader,
                m.membership_config.membership().voter_ids().count() <= 1,
                m.current_leader.is_some(),
            )
        };
        if is_leader && alone {
            return true;
        }
        (is_leader || known) && self.leader_contact_age() <= self.leaderless_grace
    }

    /// Whether this node should take traffic now (`/readyz`): it is a
    /// member, knows a fresh leader, has recovered its committed state, and
    /// has applied every entry it knows committed (waiting up to `wait` for
    /// the apply to catch up, so that a steady stream of writes does not
    /// make it flap). `Ok` carries a one-line detail, `Err` the reason.
    pub async fn readiness(&self, wait: Duration) -> Result<String, String> {
        self.check_member().map_err(|e| e.to_string())?;
        if !self.recovered.load(Ordering::Acquire) {
            return Err("still recovering its committed state".into());
        }
        if !self.leader_is_fresh() {
            return Err("no leader heard from lately".into());
        }
        let (leader, committed) = {
            let rx = self.raft.metrics();
            let m = rx.borrow_watched();
            let index = |l: &Option<openraft::alias::LogIdOf<TypeConfig>>| {
                l.as_ref().map_or(0, |l| l.index)
            };
            (
                m.current_leader.unwrap_or(0),
                index(&m.local_committed).max(index(&m.cluster_committed)),
            )
        };
        match self
            .raft
            .wait(Some(wait))
            .applied_index_at_least(Some(committed), "readiness")
            .await
        {
            Ok(m) => Ok(format!(
                "leader {leader}, applied index {}",
                m.last_applied.as_ref().map_or(0, |l| l.index)
            )),
            Err(_) => Err(format!(
                "has not applied up to its commit index {committed} within {wait:?}"
            )),
        }
    }

    /// How long ago this node last heard from a leader: on a leader, its
    /// last quorum acknowledgement (the instant, not
    /// `millis_since_quorum_ack`: metrics are republished on changes only,
    /// and a cut-off leader changes nothing); on others, the last
    /// AppendEntries, or the start of the process if none came yet.
    fn leader_contact_age(&self) -> Duration {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        if m.state == ServerState::Leader {
            // `None`: just elected, no round trip yet.
            return m.last_quorum_acked.as_ref().map_or(Duration::ZERO, |at| {
                openraft::TokioInstant::now().saturating_duration_since(**at)
            });
        }
        let contact = self.leader_contact.lock().ok().and_then(|c| *c);
        contact.unwrap_or(self.started_at).elapsed()
    }

    /// Runs `fut` (a request that needs the leader) until it completes, or
    /// until this node loses its fresh leader: `None` then. A leader cut off
    /// from its majority answers in about an election instead of after the
    /// whole write timeout.
    async fn while_leader_fresh<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep(LEADER_POLL * 5) => {
                    if !self.leader_is_fresh() {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits until a read on this node reflects every write committed before
    /// the call: the leader confirms its leadership and tells its commit
    /// index (ReadIndex), and this node applies up to it.
    pub async fn read_barrier(&self) -> Result<(), RegistryError> {
        if self.unsafe_stale_reads {
            return Ok(());
        }
        if self.unsafe_leader_local_reads
            && self.raft.metrics().borrow_watched().state == ServerState::Leader
        {
            // TEST ONLY: no read index, so no proof that it still leads.
            return Ok(());
        }
        if self.read_consistency == ReadConsistency::Local {
            return if self.recovered.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(RegistryError::Unavailable(
                    "this node is still recovering its committed state".into(),
                ))
            };
        }
        let deadline = Instant::now() + self.write_timeout;
        let index = self.read_index(deadline).await?;
        // Usually there already: no need to watch Raft's metrics for it.
        if self.store.applied_at_least(index) {
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|e| RegistryError::Unavailable(format!("this node is behind the leader: {e}")))
    }

    /// The cluster's read index: what a linearizable read on this node must
    /// have applied. Fails by `deadline`, or after about one election while
    /// no leader is known.
    pub async fn read_index(&self, deadline: Instant) -> Result<u64, RegistryError> {
        let started = Instant::now();
        let mut last = String::from("no leader is known");
        loop {
            self.check_member()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RegistryError::Unavailable(format!(
                    "no leader with a quorum: a linearizable read cannot be served ({last})"
                )));
            }
            if !self.leader_is_fresh() {
                self.wait_for_leader(started, remaining).await?;
                continue;
            }
            match self.shared_read_index(remaining).await {
                Ok(i) => return Ok(i),
                Err(ReadIndexFailure::NoLeader) => {
                    return Err(RegistryError::Unavailable(NO_LEADER.into()));
                }
                Err(ReadIndexFailure::Retry(e)) => {
                    last = e;
                    tokio::time::sleep(LEADER_POLL.min(remaining)).await;
                }
            }
        }
    }

    /// The index a linearizable read must see applied, shared by every
    /// reader that arrived before it was asked for (see [`ReadQueue`]).
    async fn shared_read_index(&self, timeout: Duration) -> Result<u64, ReadIndexFailure> {
        let sender = || {
            let this = self.clone();
            move |readers: Vec<()>| {
                let this = this.clone();
                async move {
                    // Readers over requests: how well the batching works.
                    metrics::counter!("corvid_raft_read_index_requests_total").increment(1);
                    metrics::counter!("corvid_raft_read_index_readers_total")
                        .increment(readers.len() as u64);
                    // Watched once per batch, not per reader: a leader cut
                    // off from its majority fails them all in about an
                    // election.
                    let res = match this
                        .while_leader_fresh(this.fetch_read_index(timeout))
                        .await
                    {
                        None => Err(ReadIndexFailure::NoLeader),
                        Some(r) => r.map_err(ReadIndexFailure::Retry),
                    };
                    vec![res; readers.len()]
                }
            }
        };
        self.read_batches
            .submit((), sender)
            .await
            .unwrap_or_else(|| Err(ReadIndexFailure::Retry("read-index request dropped".into())))
    }

    /// One read index: Raft's own on the leader (it confirms its leadership
    /// with a quorum), or the leader's, asked over the peer protocol.
    async fn fetch_read_index(&self, timeout: Duration) -> Result<u64, String> {
        let err = match tokio::time::timeout(timeout, self.leader_read_index()).await {
            Err(_) => return Err("the leader did not confirm its leadership in time".into()),
            Ok(Ok(index)) => return Ok(index),
            Ok(Err(e)) => e,
        };
        let addr = Self::leader_addr(&err).ok_or_else(|| err.to_string())?;
        match self
            .peers
            .call(&addr, &PeerRequest::ReadIndex, timeout)
            .await
        {
            Ok(PeerResponse::ReadIndex(i)) => Ok(i),
            Ok(other) => Err(format!("unexpected answer from the leader: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Raft's read index on this node if it leads: from its lease when
    /// [`RaftSettings::lease_reads`] is on and the lease holds, else
    /// confirmed by a quorum (ReadIndex). An error names the leader to ask
    /// when this node is not it.
    async fn leader_read_index(
        &self,
    ) -> Result<u64, openraft::error::RaftError<TypeConfig, LinearizableReadError<TypeConfig>>>
    {
        if self.lease_reads && self.raft.metrics().borrow_watched().state == ServerState::Leader {
            // An expired lease (no quorum acknowledgement for a lease) or a
            // lost leadership: the quorum round below decides.
            if let Ok(read) = self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
                return Ok(read.index());
            }
        }
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map(|read| read.index())
    }

    /// Linearizable lookup of one mailbox.
    pub async fn find(&self, name: &str) -> Result<Option<MailboxEntry>, RegistryError> {
        self.read_barrier().await?;
        Ok(self.store.mailbox(name)?)
    }

    /// Linearizable list of the mailboxes whose location starts with `prefix`.
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<MailboxEntry>, RegistryError> {
        self.read_barrier().await?;
        Ok(self.store.list_location(prefix.unwrap_or(""))?)
    }

    /// Appends a write that another node forwarded. Only the leader
    /// appends; there is no second hop, so a write is never forwarded in a
    /// circle. The leader stamps its clock.
    async fn forwarded_write(&self, mut proposal: Proposal) -> Result<Outcome, String> {
        proposal.stamp_ms = now_ms();
        match tokio::time::timeout(self.write_timeout, self.raft.client_write(proposal)).await {
            Err(_) => Err("write timed out on the leader; it may still be applied".into()),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) if e.forward_to_leader().is_some() => Err(NOT_LEADER.into()),
            Ok(Err(e)) => Err(e.to_string()),
        }
    }

    /// Answers a request from another node or from `corvidctl`.
    pub async fn handle_peer(&self, request: PeerRequest) -> PeerResponse {
        let err = |e: &dyn std::fmt::Display| PeerResponse::Error(e.to_string());
        match request {
            PeerRequest::AppendEntries(rpc) => match self.raft.append_entries(rpc).await {
                Ok(r) => {
                    if r.is_success() || r.is_conflict() {
                        // A leader of our term reached us.
                        self.note_leader_contact();
                    }
                    PeerResponse::AppendEntries(r)
                }
                Err(e) => err(&e),
            },
            PeerRequest::Vote(rpc) => match self.raft.vote(rpc).await {
                Ok(r) => PeerResponse::Vote(r),
                Err(e) => err(&e),
            },
            PeerRequest::PreVote(rpc) => match self.raft.pre_vote(rpc).await {
                Ok(r) => PeerResponse::Vote(r),
                Err(e) => err(&e),
            },
            // Served by the connection loop, which hands the socket over.
            PeerRequest::InstallSnapshot { .. } => {
                err(&"a snapshot transfer needs its own connection")
            }
            PeerRequest::Write(proposal) => match self.forwarded_write(proposal).await {
                Ok(outcome) => PeerResponse::Write(outcome),
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::WriteMany(proposals) if proposals.len() > MAX_FORWARD_BATCH => err(
                &format_args!("more than {MAX_FORWARD_BATCH} writes in one batch"),
            ),
            PeerRequest::WriteMany(proposals) => {
                // All at once, so that Raft takes them into one append.
                let writes = proposals.into_iter().map(|p| self.forwarded_write(p));
                PeerResponse::WriteMany(futures::future::join_all(writes).await)
            }
            PeerRequest::ReadIndex => {
                match tokio::time::timeout(self.write_timeout, self.leader_read_index()).await {
                    Ok(Ok(index)) => PeerResponse::ReadIndex(index),
                    Ok(Err(e)) if e.forward_to_leader().is_some() => {
                        PeerResponse::Error(NOT_LEADER.into())
                    }
                    Ok(Err(e)) => err(&e),
                    Err(_) => err(&"leader could not confirm its leadership in time"),
                }
            }
            PeerRequest::Admin(admin) => match self.admin(admin).await {
                Ok(r) => PeerResponse::Admin(r),
                Err(e) => err(&e),
            },
            PeerRequest::ClientWrite { client, command } => {
                match self.write_as(client, command).await {
                    Ok(outcome) => PeerResponse::Write(outcome),
                    Err(e) => err(&e),
                }
            }
            PeerRequest::SyncIndex => {
                match self.read_index(Instant::now() + self.write_timeout).await {
                    Ok(i) => PeerResponse::ReadIndex(i),
                    Err(e) => err(&e),
                }
            }
            // Served by the connection loop, which hands the socket over.
            PeerRequest::Follow { .. } => err(&"a log stream needs its own connection"),
            // Served by the connection loop, which knows how the peer
            // authenticated.
            PeerRequest::Users { .. } => err(&"user administration goes to the peer port"),
        }
    }

    /// Has Raft install the snapshot `meta` that the transfer `generation`
    /// staged (see [`crate::stream::receive_raft_snapshot`]), and answers
    /// the leader.
    pub async fn install_staged_snapshot(
        &self,
        vote: openraft::alias::VoteOf<TypeConfig>,
        meta: openraft::alias::SnapshotMetaOf<TypeConfig>,
        generation: u64,
    ) -> PeerResponse {
        let started = Instant::now();
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, SnapshotData> {
            meta,
            snapshot: SnapshotData::Staged(generation),
        };
        let res = self.raft.install_full_snapshot(vote, snapshot).await;
        metrics::histogram!("corvid_snapshot_install_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match res {
            Ok(r) => {
                self.note_leader_contact();
                PeerResponse::Snapshot(r)
            }
            Err(e) => {
                crate::metrics::snapshot_failed("install");
                PeerResponse::Error(e.to_string())
            }
        }
    }

    /// Runs the membership change `change` makes, again while the leader
    /// refuses it because its previous change is not committed yet (just
    /// after `init`, a few heartbeats), up to the write timeout, instead
    /// of failing the operator's call.
    async fn when_no_change_in_progress<F, Fut, T>(
        &self,
        change: F,
    ) -> Result<T, openraft::error::RaftError<TypeConfig, ClientWriteError<TypeConfig>>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<
            Output = Result<
                T,
                openraft::error::RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
            >,
        >,
    {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            let res = change().await;
            let in_progress = res
                .as_ref()
                .err()
                .and_then(|e| e.api_error())
                .is_some_and(|e| {
                    matches!(
                        e,
                        ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(
                            _
                        ))
                    )
                });
            if !in_progress || Instant::now() >= deadline {
                return res;
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    /// Cluster administration. Membership changes run on the leader; a
    /// follower passes them on.
    pub async fn admin(&self, request: AdminRequest) -> Result<AdminResponse, RegistryError> {
        let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
        let res = match &request {
            AdminRequest::Status => return Ok(AdminResponse::Status(self.status())),
            AdminRequest::Init { members } => {
                let members: BTreeMap<u64, BasicNode> = members
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                return self
                    .raft
                    .initialize(members)
                    .await
                    .map(|_| AdminResponse::Done)
                    .map_err(|e| unavailable(&e));
            }
            AdminRequest::AddLearner { id, addr } => {
                let node = BasicNode { addr: addr.clone() };
                self.when_no_change_in_progress(|| self.raft.add_learner(*id, node.clone(), true))
                    .await
            }
            AdminRequest::Promote { id } => {
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([*id]));
                self.when_no_change_in_progress(|| {
                    self.raft.change_membership(change.clone(), true)
                })
                .await
            }
            AdminRequest::Remove { id } => {
                let m = self
                    .raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .clone();
                let change = if m.voter_ids().any(|v| v == *id) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
                };
                self.when_no_change_in_progress(|| {
                    self.raft.change_membership(change.clone(), false)
                })
                .await
            }
        };
        match res {
            Ok(_) => Ok(AdminResponse::Done),
            Err(e) => match Self::leader_addr(&e) {
                Some(addr) if e.forward_to_leader().is_some() => {
                    match self
                        .peers
                        .call(
                            &addr,
                            &PeerRequest::Admin(request),
                            Duration::from_secs(120),
                        )
                        .await
                    {
                        Ok(PeerResponse::Admin(r)) => Ok(r),
                        Ok(other) => Err(RegistryError::Unavailable(format!(
                            "leader answered {other:?}"
                        ))),
                        Err(e) => Err(unavailable(&e)),
                    }
                }
                _ => Err(unavailable(&e)),
            },
        }
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        NodeStatus {
            id: m.id,
            role: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            voters: membership.voter_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            member: membership.get_node(&m.id).is_some() && !self.removed.load(Ordering::Acquire),
            leader_fresh: self.leader_is_fresh(),
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// Mirrors Raft's metrics into Prometheus gauges as they change, and
    /// at least every [`METRICS_REFRESH`]: a node cut off from the leader
    /// changes nothing in Raft's metrics, yet its leader goes stale and
    /// its peers' heartbeat ages grow.
    fn spawn_metrics(&self) {
        let mut rx = self.raft.metrics();
        let store = self.store.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let mut last_leader = None;
            let mut shown_peers = BTreeSet::new();
            loop {
                {
                    let m = rx.borrow_and_update().clone();
                    metrics::gauge!("corvid_raft_voters")
                        .set(m.membership_config.membership().voter_ids().count() as f64);
                    metrics::gauge!("corvid_raft_term").set(m.current_term as f64);
                    metrics::gauge!("corvid_raft_last_log_index")
                        .set(m.last_log_index.unwrap_or(0) as f64);
                    metrics::gauge!("corvid_raft_log_purged_index")
                        .set(m.purged.as_ref().map_or(0, |l| l.index) as f64);
                    metrics::gauge!("corvid_raft_snapshot_index")
                        .set(m.snapshot.as_ref().map_or(0, |l| l.index) as f64);
                    let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
                    metrics::gauge!("corvid_raft_applied_index").set(applied as f64);
                    metrics::gauge!("corvid_raft_leader_id")
                        .set(m.current_leader.unwrap_or(0) as f64);
                    // Fresh, not merely known: with pre-vote a cut-off node
                    // keeps its vote, and so a leader id, forever.
                    metrics::gauge!("corvid_server_has_leader")
                        .set(f64::from(u8::from(this.leader_is_fresh())));
                    metrics::gauge!("corvid_server_is_leader")
                        .set(f64::from(u8::from(m.state == ServerState::Leader)));
                    metrics::gauge!("corvid_disk_sst_bytes").set(store.disk_bytes() as f64);
                    let last = m.last_log_index.unwrap_or(0);
                    if let Some(replication) = &m.replication {
                        // The leader lists itself; these are about its peers.
                        for (peer, matched) in replication.iter().filter(|(p, _)| **p != m.id) {
                            let matched = matched.as_ref().map_or(0, |l| l.index);
                            metrics::gauge!("corvid_raft_peer_lag_entries", "peer" => peer.to_string())
                                .set(last.saturating_sub(matched) as f64);
                        }
                    }
                    if let Some(heartbeat) = &m.heartbeat {
                        for (peer, acked) in heartbeat.iter().filter(|(p, _)| **p != m.id) {
                            // Never acknowledged since this leader took
                            // over: as unreachable as can be.
                            let age = acked.as_ref().map_or(f64::INFINITY, |at| {
                                openraft::TokioInstant::now()
                                    .saturating_duration_since(**at)
                                    .as_secs_f64()
                            });
                            metrics::gauge!("corvid_raft_peer_heartbeat_age_seconds", "peer" => peer.to_string())
                                .set(age);
                        }
                    }
                    // Peers this node no longer replicates to (it stopped
                    // leading, or they left): NaN, not a frozen value that
                    // alert rules would take for a live or a dead peer.
                    let peers: BTreeSet<_> = m
                        .heartbeat
                        .iter()
                        .flat_map(|h| h.keys())
                        .chain(m.replication.iter().flat_map(|r| r.keys()))
                        .copied()
                        .filter(|p| *p != m.id)
                        .collect();
                    for gone in shown_peers.difference(&peers) {
                        let peer = gone.to_string();
                        metrics::gauge!("corvid_raft_peer_lag_entries", "peer" => peer.clone())
                            .set(f64::NAN);
                        metrics::gauge!("corvid_raft_peer_heartbeat_age_seconds", "peer" => peer)
                            .set(f64::NAN);
                    }
                    shown_peers = peers;
                    if m.current_leader != last_leader {
                        if m.current_leader.is_some() {
                            metrics::counter!("corvid_server_leader_changes_seen_total")
                                .increment(1);
                        }
                        last_leader = m.current_leader;
                    }
                }
                // Raft republishes its metrics on every append and apply,
                // thousands of times a second under load: refresh the gauges
                // at most every METRICS_MIN_INTERVAL (the changes meanwhile
                // are read together), not once per change.
                tokio::time::sleep(METRICS_MIN_INTERVAL).await;
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() {
                        break;
                    },
                    _ = tokio::time::sleep(METRICS_REFRESH) => {}
                }
            }
        });
    }
}

/// What became of a write forwarded to the leader.
#[derive(Debug, Clone)]
enum Forwarded {
    /// Applied, with this outcome.
    Done(Outcome),
    /// The node asked no longer leads; nothing was done.
    NotLeader,
    /// The leader answered something that is not an answer to a write.
    Unexpected(String),
    /// No answer within the write timeout.
    Timeout,
    /// Not sent, or the answer was lost: safe to try again (the session
    /// table answers a repeat).
    Failed(String),
}

/// Writes being forwarded to one leader.
type ForwardQueue = Coalescer<Proposal, Forwarded>;

/// Batches of forwarded writes out at once to one leader.
const FORWARDS_IN_FLIGHT: usize = 4;

/// Most writes forwarded in one batch (and accepted in one by a leader).
pub const MAX_FORWARD_BATCH: usize = 1024;

/// Shortest time between two refreshes of the Raft gauges.
const METRICS_MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Longest time the Raft gauges go without a refresh.
const METRICS_REFRESH: Duration = Duration::from_secs(1);

/// The text a node answers when a forwarded request reached a node that is
/// no longer the leader (and so did nothing).
pub const NOT_LEADER: &str = "not the leader";

/// Errors that may name the current leader.
trait LeaderHint {
    fn leader_addr(&self) -> Option<String>;
}

impl<E> LeaderHint for openraft::error::RaftError<TypeConfig, E>
where
    E: std::fmt::Debug + openraft::TryAsRef<openraft::error::ForwardToLeader<TypeConfig>>,
{
    fn leader_addr(&self) -> Option<String> {
        self.forward_to_leader()?
            .leader_node
            .as_ref()
            .map(|n| n.addr.clone())
    }
}

/// Raft's peer network: one [`PeerClient`] per target, bincode frames over
/// TCP; snapshots on a connection of their own, in chunks.
#[derive(Clone, Default)]
pub struct Network {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Idle connections for the leader's probes (see
    /// [`RaftNetworkFactory::new_heartbeat_client`]).
    pool: PeerPool,
    /// TEST ONLY: pause before each snapshot chunk sent (see
    /// [`RaftSettings::unsafe_test_stream_frame_delay_ms`]).
    chunk_delay: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Self::Network {
        PeerLink {
            client: PeerClient::with_tls(node.addr.clone(), self.tls.clone()),
            pool: None,
            tls: self.tls.clone(),
            chunk_delay: self.chunk_delay,
        }
    }

    /// openraft makes one of these for every leadership probe of a
    /// ReadIndex read (one per follower per batch of reads): on pooled
    /// connections, not a TCP (and with peer TLS, a TLS) handshake each.
    async fn new_heartbeat_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerLink {
            pool: Some(self.pool.clone()),
            ..self.new_client(target, node).await
        }
    }
}

/// The connection to one peer, as Raft uses it.
pub struct PeerLink {
    client: PeerClient,
    /// Calls go through this pool (to `client`'s address) when set.
    pool: Option<PeerPool>,
    tls: Option<Arc<rustls::ClientConfig>>,
    chunk_delay: Duration,
}

fn vote_response(r: PeerResponse) -> Result<VoteResponse<TypeConfig>, Box<PeerResponse>> {
    match r {
        PeerResponse::Vote(v) => Ok(v),
        other => Err(Box::new(other)),
    }
}

impl PeerLink {
    /// Sends one Raft RPC and picks the expected answer out of the response.
    async fn rpc<T>(
        &mut self,
        request: PeerRequest,
        option: RPCOption,
        expect: impl FnOnce(PeerResponse) -> Result<T, Box<PeerResponse>>,
    ) -> Result<T, RPCError<TypeConfig>> {
        let res = match &self.pool {
            Some(pool) => {
                pool.call(self.client.addr(), &request, option.hard_ttl())
                    .await
            }
            None => self.client.call(&request, option.hard_ttl()).await,
        };
        match res {
            Ok(r) => {
                expect(r).map_err(|other| RPCError::Network(NetworkError::new(&unexpected(*other))))
            }
            Err(e) => Err(rpc_error(e)),
        }
    }
}

fn rpc_error(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Io { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerRequest::AppendEntries(rpc), option, |r| match r {
            PeerResponse::AppendEntries(r) => Ok(r),
            other => Err(Box::new(other)),
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerRequest::Vote(rpc), option, vote_response)
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(PeerRequest::PreVote(rpc), option, vote_response)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: openraft::alias::VoteOf<TypeConfig>,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let started = Instant::now();
        let SnapshotData::View(view) = snapshot.snapshot else {
            return Err(StreamingError::Network(NetworkError::new(
                &std::io::Error::other("only a view of this node's state can be sent"),
            )));
        };
        let send = crate::stream::send_raft_snapshot(
            self.client.addr(),
            self.tls.as_ref(),
            vote,
            snapshot.meta,
            view,
            option.hard_ttl().max(Duration::from_secs(10)),
            self.chunk_delay,
        );
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = send => res,
        };
        metrics::histogram!("corvid_snapshot_send_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if res.is_err() {
            crate::metrics::snapshot_failed("send");
        }
        match res {
            Ok(r) => Ok(r),
            Err(e @ PeerError::Io { .. }) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

fn unexpected(r: PeerResponse) -> std::io::Error {
    std::io::Error::other(format!("unexpected peer answer: {r:?}"))
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
