//! The peer protocol between registry nodes: Raft RPCs, forwarded writes,
//! read-index requests and cluster administration, as length-prefixed
//! bincode frames over TCP.
//!
//! Framing ([`write_frame`], [`FrameDecoder`]) is pure; [`PeerClient`] and
//! [`serve`] own the sockets. The peer port carries cluster control, so it
//! belongs on a network only the registry nodes and their operators reach.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use openraft::alias::{SnapshotMetaOf, VoteOf};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::model::{ClientTag, Outcome, Proposal, RegistryCommand};
use crate::raft::{Registry, TypeConfig};
use crate::users::{AdminLogin, UserAdmin, UserRequest, UserResponse};

/// Largest frame accepted. Snapshots travel in chunks of about
/// [`crate::store::SNAPSHOT_CHUNK_BYTES`], far below it, so no registry size
/// needs a larger frame.
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// A request from one node (or `corvidctl`) to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<TypeConfig>),
    /// Raft pre-vote.
    PreVote(VoteRequest<TypeConfig>),
    /// Turn this connection into a snapshot transfer from the leader: the
    /// state follows as [`crate::stream::StreamFrame::SnapshotChunk`]s, then
    /// [`crate::stream::StreamFrame::SnapshotEnd`]; the follower answers
    /// [`PeerResponse::Snapshot`] once it installed it (see
    /// [`crate::stream::receive_raft_snapshot`]).
    InstallSnapshot {
        /// The leader's vote.
        vote: VoteOf<TypeConfig>,
        /// What the snapshot covers.
        meta: SnapshotMetaOf<TypeConfig>,
    },
    /// A write forwarded by a node that is not the leader (the leader
    /// re-stamps it with its own clock).
    Write(Proposal),
    /// "What must I apply before a linearizable read?" (to the leader).
    ReadIndex,
    /// Cluster administration.
    Admin(AdminRequest),
    /// A write from a replica: the node commits it as its own MUPDATE
    /// sessions do (forwarding it to the leader if need be).
    ClientWrite {
        /// The request's session and number; retries reuse it.
        client: ClientTag,
        /// What to do.
        command: RegistryCommand,
    },
    /// "What index must I apply to be as fresh as the cluster?" Any master
    /// answers, with the leader's read index (a replica's NOOP waits for it).
    SyncIndex,
    /// Turn this connection into a log stream of every committed entry
    /// after index `after` (see [`crate::stream`]).
    Follow {
        /// The last index the follower applied (0 for none).
        after: u64,
    },
    /// User administration (`corvidctl user`, see [`crate::users`]).
    Users {
        /// The request's session and number; retries reuse it.
        client: ClientTag,
        /// An administrator's login; not needed over peer mutual TLS.
        login: Option<AdminLogin>,
        /// What to do.
        request: UserRequest,
    },
    /// Writes forwarded together by a node that is not the leader (see
    /// [`crate::coalesce`]); the leader re-stamps each with its own clock
    /// and answers each on its own, in order.
    WriteMany(Vec<Proposal>),
}

impl PeerRequest {
    /// Whether sending the request twice does what sending it once does:
    /// writes carry their client tag (the state machine answers a repeat
    /// from its session table), read indexes and status are reads. Raft
    /// RPCs and membership changes are not pooled and never repeated.
    pub fn safe_to_repeat(&self) -> bool {
        matches!(
            self,
            PeerRequest::Write(_)
                | PeerRequest::WriteMany(_)
                | PeerRequest::ClientWrite { .. }
                | PeerRequest::ReadIndex
                | PeerRequest::SyncIndex
                | PeerRequest::Admin(AdminRequest::Status)
        )
    }
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answer to `AppendEntries`.
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    /// Answer to `Vote` and `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// Answer to `InstallSnapshot`.
    Snapshot(SnapshotResponse<TypeConfig>),
    /// The outcome of a forwarded write.
    Write(Outcome),
    /// The log index a reader must have applied.
    ReadIndex(u64),
    /// Answer to `Admin`.
    Admin(AdminResponse),
    /// Answer to `Users`.
    Users(UserResponse),
    /// The request failed; the text says why.
    Error(String),
    /// Answer to `WriteMany`: each write's outcome, or why it failed
    /// ([`crate::raft::NOT_LEADER`] when it reached a node that no longer leads, and so
    /// did nothing).
    WriteMany(Vec<Result<Outcome, String>>),
}

/// Cluster administration requests (`corvidctl cluster ...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Initialize a new cluster with these voters (id, peer address).
    Init {
        /// Voters.
        members: Vec<(u64, String)>,
    },
    /// Add a non-voting member that starts replicating.
    AddLearner {
        /// Node id.
        id: u64,
        /// Its peer address.
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node id.
        id: u64,
    },
    /// Remove a voter or learner.
    Remove {
        /// Node id.
        id: u64,
    },
    /// This node's view of the cluster.
    Status,
}

/// Answers to [`AdminRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResponse {
    /// Done.
    Done,
    /// A node's status.
    Status(NodeStatus),
}

/// One node's view, for `corvidctl cluster status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: u64,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<u64>,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied_index: u64,
    /// Voter ids.
    pub voters: Vec<u64>,
    /// Peer address of every member.
    pub nodes: BTreeMap<u64, String>,
    /// On the leader: each member's matched log index.
    pub matched: BTreeMap<u64, Option<u64>>,
    /// Whether this node is in the membership it knows (false on a node
    /// removed from the cluster, or never added to one).
    pub member: bool,
    /// Whether this node heard from a leader within about one election.
    pub leader_fresh: bool,
}

/// Peer protocol errors.
#[derive(Debug, Error)]
pub enum PeerError {
    /// Socket error.
    #[error("peer {addr}: {source}")]
    Io {
        /// Peer address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("peer {0}: timed out")]
    Timeout(String),
    /// A frame could not be decoded or was too large.
    #[error("peer {addr}: bad frame: {reason}")]
    Frame {
        /// Peer address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("peer {addr}: {message}")]
    Remote {
        /// Peer address.
        addr: String,
        /// Its message.
        message: String,
    },
}

impl PeerError {
    /// The error of a failed [`read_frame`] from `addr`.
    pub fn from_read(addr: &str, e: std::io::Error) -> PeerError {
        match e.kind() {
            std::io::ErrorKind::InvalidData => PeerError::Frame {
                addr: addr.to_owned(),
                reason: e.to_string(),
            },
            _ => PeerError::Io {
                addr: addr.to_owned(),
                source: e,
            },
        }
    }
}

/// Appends `value` as one frame: a 4-byte big-endian length, then bincode.
pub fn write_frame<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), String> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(format!(
            "frame of {} bytes exceeds {MAX_FRAME_BYTES}",
            body.len()
        ));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes one frame from the front of `buf`: `Ok(None)` until it is whole.
///
/// Nothing is reserved for the announced length: a peer that announces a
/// large frame and sends nothing more costs only what it sent (the reader's
/// buffer grows as bytes arrive).
pub fn decode_frame<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<T>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(format!("frame of {len} bytes exceeds {max}"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len);
    // bincode allocates a string's or byte buffer's announced length before
    // reading it; unlimited, a 12-byte frame announcing an exabyte aborts the
    // process. Its limit counts what decoding claims in memory, not wire
    // bytes: a string claims its length, but every one-byte varint claims
    // its integer's size (8 for a u64, 16 at most) and every enum tag 4, so
    // honest frames claim several times their length. The limit is the
    // smallest of a few sizes at least 16 times the body (past 64 MiB, the
    // largest frame accepted: snapshots, whose bytes claim one each).
    match body.len() {
        0..=4096 => decode_body::<T, { 64 << 10 }>(&body),
        4097..=65_536 => decode_body::<T, { 1 << 20 }>(&body),
        65_537..=1_048_576 => decode_body::<T, { 16 << 20 }>(&body),
        _ => decode_body::<T, MAX_FRAME_BYTES>(&body),
    }
    .map(Some)
}

/// Decodes a frame body, claiming at most `LIMIT` bytes for its contents.
fn decode_body<T: DeserializeOwned, const LIMIT: usize>(body: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    bincode::serde::decode_from_slice(body, config)
        .map(|(v, _)| v)
        .map_err(|e| e.to_string())
}

/// Reads one frame of at most [`MAX_FRAME_BYTES`] from `socket`, `buf`
/// holding what was read before (and keeping what follows the frame). A bad
/// frame is `InvalidData`; a peer that closes first, `UnexpectedEof`.
pub async fn read_frame<T, S>(socket: &mut S, buf: &mut BytesMut) -> std::io::Result<T>
where
    T: DeserializeOwned,
    S: tokio::io::AsyncRead + Unpin,
{
    loop {
        match decode_frame::<T>(buf, MAX_FRAME_BYTES) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(reason) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, reason))
            }
        }
        if socket.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            ));
        }
    }
}

/// Opens a connection to the peer at `addr`, with mutual TLS when `tls` is
/// set.
pub async fn connect(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn PeerIo>, PeerError> {
    let io = |source| PeerError::Io {
        addr: addr.to_owned(),
        source,
    };
    let s = TcpStream::connect(addr).await.map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let Some(config) = tls else {
        return Ok(Box::new(s));
    };
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| PeerError::Frame {
            addr: addr.to_owned(),
            reason: format!("bad TLS server name: {e}"),
        })?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, s)
        .await
        .map_err(io)?;
    Ok(Box::new(tls))
}

/// Idle connections to other nodes, by address, for forwarded requests.
#[derive(Clone, Default)]
pub struct PeerPool {
    idle: Arc<Mutex<HashMap<String, Vec<PeerClient>>>>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl PeerPool {
    /// An empty pool; connections use mutual TLS when `tls` is set.
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> PeerPool {
        PeerPool {
            idle: Arc::default(),
            tls,
        }
    }

    /// Sends `request` to `addr` on an idle connection (or a new one) and
    /// keeps the connection for reuse when the call succeeds.
    ///
    /// An idle connection may have died with its peer (a node restarted at
    /// the same address): the call then fails at once with an I/O error.
    /// Such a call is retried once on a fresh connection, within the same
    /// `timeout`, when the request is safe to repeat (it may have reached
    /// the peer before the connection broke; see
    /// [`PeerRequest::safe_to_repeat`]), and the other idle connections to
    /// `addr`, as old, are dropped.
    pub async fn call(
        &self,
        addr: &str,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let pooled = self
            .idle
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(addr)?.pop());
        let reused = pooled.is_some();
        let mut client = pooled.unwrap_or_else(|| PeerClient::with_tls(addr, self.tls.clone()));
        let mut res = client.call(request, timeout).await;
        if reused && matches!(res, Err(PeerError::Io { .. })) && request.safe_to_repeat() {
            metrics::counter!("corvid_peer_pool_stale_retries_total").increment(1);
            if let Ok(mut m) = self.idle.lock() {
                m.remove(addr);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !remaining.is_zero() {
                tracing::debug!(
                    addr,
                    "pooled peer connection failed; retrying on a fresh one"
                );
                client = PeerClient::with_tls(addr, self.tls.clone());
                res = client.call(request, remaining).await;
            }
        }
        if res.is_ok() {
            if let Ok(mut m) = self.idle.lock() {
                let v = m.entry(addr.to_owned()).or_default();
                if v.len() < 64 {
                    v.push(client);
                }
            }
        }
        res
    }
}

/// A socket to a peer, plain or TLS.
pub trait PeerIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> PeerIo for T {}

/// A connection to one peer, re-established on demand.
pub struct PeerClient {
    addr: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<(Box<dyn PeerIo>, BytesMut)>,
}

impl PeerClient {
    /// A plain-TCP client for `addr` (connects on first call).
    pub fn new(addr: impl Into<String>) -> PeerClient {
        PeerClient::with_tls(addr, None)
    }

    /// A client for `addr` that uses mutual TLS when `tls` is set.
    pub fn with_tls(addr: impl Into<String>, tls: Option<Arc<rustls::ClientConfig>>) -> PeerClient {
        PeerClient {
            addr: addr.into(),
            tls,
            conn: None,
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `request` and waits up to `timeout` for the answer. Any failure
    /// drops the connection, so the next call starts clean.
    pub async fn call(
        &mut self,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let addr = self.addr.clone();
        let res = tokio::time::timeout(timeout, self.call_inner(request)).await;
        let res = match res {
            Err(_) => Err(PeerError::Timeout(addr.clone())),
            Ok(r) => r,
        };
        match res {
            Ok(PeerResponse::Error(message)) => Err(PeerError::Remote { addr, message }),
            Ok(r) => Ok(r),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    async fn call_inner(&mut self, request: &PeerRequest) -> Result<PeerResponse, PeerError> {
        let addr = self.addr.clone();
        let io = |source| PeerError::Io {
            addr: addr.clone(),
            source,
        };
        if self.conn.is_none() {
            let stream = connect(&self.addr, self.tls.as_ref()).await?;
            self.conn = Some((stream, BytesMut::with_capacity(8192)));
        }
        let (stream, buf) = self.conn.as_mut().expect("connected above");
        let mut out = Vec::new();
        write_frame(&mut out, request).map_err(|reason| PeerError::Frame {
            addr: addr.clone(),
            reason,
        })?;
        stream.write_all(&out).await.map_err(io)?;
        read_frame(stream, buf)
            .await
            .map_err(|e| PeerError::from_read(&addr, e))
    }
}

/// Serves peer requests on `listener` for as long as the task runs; with
/// `tls`, only peers presenting a certificate of the cluster's CA get past
/// the handshake. At most `max_connections` at once: more are closed at
/// once. `accept()` errors are counted and retried after a pause. User
/// administration requests are answered by `users`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    users: Arc<UserAdmin>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut listener = crate::net::Acceptor::new(listener, "peer");
    loop {
        let (socket, peer) = listener.accept().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("corvid_peer_connections_rejected_total").increment(1);
            tracing::warn!(%peer, max_connections, "peer connection refused: too many open");
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let registry = registry.clone();
        let acceptor = acceptor.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let _permit = permit;
            metrics::gauge!("corvid_peer_connections_open").increment(1.0);
            let _open = OnDrop(|| metrics::gauge!("corvid_peer_connections_open").decrement(1.0));
            let res = match acceptor {
                None => serve_connection(socket, peer, registry, users, false).await,
                Some(a) => {
                    match tokio::time::timeout(Duration::from_secs(10), a.accept(socket)).await {
                        // The handshake verified the peer's certificate.
                        Ok(Ok(tls)) => serve_connection(tls, peer, registry, users, true).await,
                        Ok(Err(e)) => {
                            metrics::counter!("corvid_peer_tls_refused_total").increment(1);
                            tracing::warn!(%peer, "peer TLS handshake refused: {e}");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, "peer connection ended: {e}");
            }
        });
    }
}

/// Runs a closure when dropped (also when the task is aborted).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

async fn serve_connection<S>(
    mut socket: S,
    peer: SocketAddr,
    registry: Registry,
    users: Arc<UserAdmin>,
    peer_verified: bool,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8192);
    let registry = Arc::new(registry);
    loop {
        let request = loop {
            match decode_frame::<PeerRequest>(&mut buf, MAX_FRAME_BYTES) {
                Ok(Some(PeerRequest::Follow { after })) => {
                    tracing::info!(%peer, after, "a follower opened a log stream");
                    return crate::stream::serve_follower(&mut socket, &registry, after).await;
                }
                Ok(Some(PeerRequest::InstallSnapshot { vote, meta })) => {
                    tracing::info!(%peer, "receiving a snapshot from the leader");
                    return crate::stream::receive_raft_snapshot(
                        &mut socket,
                        &mut buf,
                        &registry,
                        vote,
                        meta,
                    )
                    .await;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(%peer, "dropping peer connection: {reason}");
                    return Ok(());
                }
            }
            if socket.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let response = match request {
            PeerRequest::Users {
                client,
                login,
                request,
            } => {
                users
                    .handle(&registry, peer_verified, client, login, request)
                    .await
            }
            request => registry.handle_peer(request).await,
        };
        let mut out = Vec::new();
        if let Err(e) = write_frame(&mut out, &response) {
            out.clear();
            write_frame(&mut out, &PeerResponse::Error(e)).map_err(std::io::Error::other)?;
        }
        socket.write_all(&out).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut out = Vec::new();
        write_frame(
            &mut out,
            &PeerRequest::Write(Proposal {
                client: Some(ClientTag::once()),
                stamp_ms: 1,
                command: RegistryCommand::Delete {
                    name: "user.a".into(),
                },
            }),
        )
        .unwrap();
        write_frame(&mut out, &PeerRequest::ReadIndex).unwrap();
        for chunk in [1, 2, 3, 7, 64] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in out.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(r) = decode_frame::<PeerRequest>(&mut buf, MAX_FRAME_BYTES).unwrap()
                {
                    got.push(format!("{r:?}"));
                }
            }
            assert_eq!(got.len(), 2, "chunk {chunk}");
            assert!(got[0].contains("user.a"));
            assert_eq!(got[1], "ReadIndex");
        }
    }

    #[test]
    fn announced_length_is_not_reserved_before_it_arrives() {
        // 256 MiB announced, 3 body bytes sent.
        let len: u32 = 256 << 20;
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(b"abc");
        for _ in 0..3 {
            assert!(decode_frame::<PeerRequest>(&mut buf, MAX_FRAME_BYTES)
                .unwrap()
                .is_none());
        }
        assert!(
            buf.capacity() < 64 * 1024,
            "decode_frame reserved {} bytes for a frame that has not arrived",
            buf.capacity()
        );
        assert_eq!(buf.len(), 7, "nothing consumed from a partial frame");
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut buf = BytesMut::from(&[0xFFu8, 0xFF, 0xFF, 0xFF][..]);
        assert!(decode_frame::<PeerRequest>(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xFF, 0xFF, 0xFF][..]);
        assert!(decode_frame::<PeerRequest>(&mut buf, 1024).is_err());
    }

    /// bincode's limit counts what decoding claims in memory (eight bytes
    /// for every varint, four for every enum tag), not wire bytes: honest
    /// frames claim several times their length. A replica that missed 50
    /// ordinary writes, or followed a log of 1,000-mailbox batches, was
    /// refused its stream frames ("LimitExceeded") on every reconnect.
    #[test]
    fn honest_stream_frames_decode_whatever_their_size() {
        use crate::store::{LogRecord, StateItem};
        use crate::stream::StreamFrame;
        use openraft::alias::{LeaderIdOf, LogIdOf};
        use openraft::vote::RaftLeaderIdExt;
        let log_id = |index| {
            let leader = <LeaderIdOf<TypeConfig> as RaftLeaderIdExt>::new_committed(3, 1);
            LogIdOf::<TypeConfig>::new(leader, index)
        };
        let activate = |i: usize| RegistryCommand::Activate {
            name: format!("user.b{i:05}"),
            location: "be1!default".into(),
            acl: "anyone\tlrs\t".into(),
        };
        let record = |index: u64, command| LogRecord {
            log_id: log_id(index),
            proposal: Some(Proposal {
                client: Some(ClientTag::once()),
                stamp_ms: 1_764_480_000_000,
                command,
            }),
        };
        let frames = [
            // A few to a thousand ordinary writes (the smallest limit's range
            // and the next).
            (1..=50)
                .map(|i| record(i, activate(i as usize)))
                .collect::<Vec<_>>(),
            (1..=1024)
                .map(|i| record(i, activate(i as usize)))
                .collect(),
            // Batches of a thousand mailboxes.
            (1..=21)
                .map(|i| record(i, RegistryCommand::Batch((0..1000).map(activate).collect())))
                .collect(),
        ];
        for records in frames {
            let n = records.len();
            let mut out = Vec::new();
            write_frame(
                &mut out,
                &StreamFrame::Records {
                    records,
                    master_applied: 1 << 40,
                },
            )
            .unwrap();
            let mut buf = BytesMut::from(&out[..]);
            match decode_frame::<StreamFrame>(&mut buf, MAX_FRAME_BYTES) {
                Ok(Some(StreamFrame::Records { records, .. })) => assert_eq!(records.len(), n),
                other => panic!("{n} records in {} bytes: {other:?}", out.len()),
            }
        }
        let chunk = (0..2048)
            .map(|i| {
                StateItem::Mailbox(crate::model::MailboxEntry {
                    name: format!("user.b{i:05}"),
                    location: "be1!default".into(),
                    acl: "anyone\tlrs\t".into(),
                    state: crate::model::MailboxState::Active,
                    last_change: 1 << 30,
                })
            })
            .collect();
        let mut out = Vec::new();
        write_frame(&mut out, &StreamFrame::SnapshotChunk(chunk)).unwrap();
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(
            decode_frame::<StreamFrame>(&mut buf, MAX_FRAME_BYTES),
            Ok(Some(StreamFrame::SnapshotChunk(c))) if c.len() == 2048
        ));
    }

    /// Found by `fuzz/fuzz_targets/frames.rs`: a 12-byte `PeerResponse::Error`
    /// whose string announces ~3.6 EB made bincode allocate that much before
    /// reading, and the allocation failure aborted the process.
    #[test]
    fn huge_announced_string_is_refused_without_allocating() {
        // [len][PeerResponse::Error][u64 varint 0x31f1f1f9f3ffffff][2 bytes]
        let crash = [
            0x00, 0x00, 0x00, 0x0c, 0x06, 0xfd, 0xff, 0xff, 0xff, 0xf3, 0xf9, 0xf1, 0xf1, 0x31,
            0x32, 0x37,
        ];
        let mut buf = BytesMut::from(&crash[..]);
        assert!(decode_frame::<PeerResponse>(&mut buf, MAX_FRAME_BYTES).is_err());
        assert!(buf.is_empty());
        // A request's string: Admin(Init { members: [(1, <2^63 bytes>)] }).
        let body = [6u8, 0, 1, 1, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x80];
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut buf = BytesMut::from(&wire[..]);
        assert!(decode_frame::<PeerRequest>(&mut buf, MAX_FRAME_BYTES).is_err());
    }
}
