//! The log stream: "every committed change after index N", served by every
//! master node on its peer port to replicas.
//!
//! A follower sends [`crate::peer::PeerRequest::Follow`] with the last index
//! it applied; the connection then carries only [`StreamFrame`]s, master to
//! follower, in commit order. Records are read from the Raft log in RocksDB
//! at or below the node's applied index (so only committed entries cross),
//! a frame at a time, and each is written before the next is read: a slow
//! follower slows its own stream and costs the master one frame of memory.
//! When the follower's position has been compacted away, the stream sends
//! the state as a chunked snapshot and continues after it. While there is
//! nothing to send, a heartbeat tells the follower the master's applied
//! index and whether it knows a leader, so a follower can measure its lag
//! and leave a master cut off from the cluster.
//!
//! Raft snapshots travel the same way, leader to follower on a connection
//! of their own ([`send_raft_snapshot`], [`receive_raft_snapshot`]): the
//! same chunk frames, read from a point-in-time view as they are sent and
//! staged by the follower as they arrive, then swapped in whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use openraft::alias::{LogIdOf, SnapshotMetaOf, VoteOf};
use openraft::raft::SnapshotResponse;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::peer::{connect, read_frame, write_frame, PeerError, PeerRequest, PeerResponse};
use crate::raft::{Registry, TypeConfig};
use crate::store::{LogRecord, StateItem, StateView, Store};

/// Most log records in one frame.
pub const RECORDS_PER_FRAME: usize = 1024;
/// How often an idle stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// What a master sends down a log stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamFrame {
    /// The follower's state is replaced: the snapshot's mailboxes, client
    /// sessions and clock follow in [`StreamFrame::SnapshotChunk`]s, then
    /// [`StreamFrame::SnapshotEnd`]. The follower stages them and swaps
    /// them in at the end.
    SnapshotBegin {
        /// The last log entry the snapshot reflects.
        log_id: Option<LogIdOf<TypeConfig>>,
    },
    /// Some of the snapshot's state.
    SnapshotChunk(Vec<StateItem>),
    /// The snapshot is complete; records after it follow.
    SnapshotEnd,
    /// Committed log entries, consecutive, in order.
    Records {
        /// The entries.
        records: Vec<LogRecord>,
        /// The master's applied index when they were sent.
        master_applied: u64,
    },
    /// Nothing new.
    Heartbeat {
        /// The master's applied index.
        master_applied: u64,
        /// Whether the master heard from a leader within about one election
        /// (a master cut off from the cluster stops seeing new entries;
        /// followers should go elsewhere).
        has_leader: bool,
    },
}

/// A follower gives up a Raft snapshot transfer that sends nothing for
/// this long (its leader died or was cut off); a newer transfer may take
/// the staging family over before that.
pub const SNAPSHOT_SILENCE: Duration = Duration::from_secs(30);

async fn send<S: AsyncWrite + Unpin, T: Serialize>(
    socket: &mut S,
    frame: &T,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    write_frame(&mut out, frame).map_err(std::io::Error::other)?;
    socket.write_all(&out).await
}

/// Sends a Raft snapshot (its metadata `meta` and the point-in-time `view`
/// it was read from) to the follower at `addr` on a connection of its own,
/// and returns the follower's answer once it installed it. Every step (a
/// chunk written, the answer) must finish within `step_timeout`, however
/// large the registry. `chunk_delay` (TEST ONLY, normally zero) is a pause
/// before each chunk, so that tests can kill a follower mid-transfer.
pub async fn send_raft_snapshot(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    vote: VoteOf<TypeConfig>,
    meta: SnapshotMetaOf<TypeConfig>,
    mut view: StateView,
    step_timeout: Duration,
    chunk_delay: Duration,
) -> Result<SnapshotResponse<TypeConfig>, PeerError> {
    let started = Instant::now();
    let io = |source| PeerError::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut socket = within(step_timeout, addr, connect(addr, tls)).await??;
    let request = PeerRequest::InstallSnapshot { vote, meta };
    within(step_timeout, addr, send(&mut socket, &request))
        .await?
        .map_err(io)?;
    let mut chunks = 0u64;
    while let Some(items) = view.next_chunk().await.map_err(io)? {
        if !chunk_delay.is_zero() {
            tokio::time::sleep(chunk_delay).await;
        }
        let frame = StreamFrame::SnapshotChunk(items);
        within(step_timeout, addr, send(&mut socket, &frame))
            .await?
            .map_err(io)?;
        chunks += 1;
        metrics::counter!("corvid_snapshot_chunks_sent_total").increment(1);
    }
    within(
        step_timeout,
        addr,
        send(&mut socket, &StreamFrame::SnapshotEnd),
    )
    .await?
    .map_err(io)?;
    let mut buf = BytesMut::with_capacity(8192);
    let answer = within(
        step_timeout,
        addr,
        read_frame::<PeerResponse, _>(&mut socket, &mut buf),
    )
    .await?
    .map_err(|e| PeerError::from_read(addr, e))?;
    tracing::info!(
        addr,
        chunks,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "sent a snapshot to a follower"
    );
    match answer {
        PeerResponse::Snapshot(r) => Ok(r),
        PeerResponse::Error(message) => Err(PeerError::Remote {
            addr: addr.to_owned(),
            message,
        }),
        other => Err(PeerError::Frame {
            addr: addr.to_owned(),
            reason: format!("unexpected answer to a snapshot: {other:?}"),
        }),
    }
}

/// `f`, or a timeout error from `addr` after `limit`.
async fn within<T>(
    limit: Duration,
    addr: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, PeerError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PeerError::Timeout(addr.to_owned()))
}

/// Receives a Raft snapshot on `socket` (after its
/// [`PeerRequest::InstallSnapshot`]; `buf` holds what was read past it):
/// stages the chunks as they arrive, then has Raft install it, which swaps
/// it in whole, and answers. Memory stays bounded by a chunk; a transfer
/// cut short leaves the live state untouched.
pub async fn receive_raft_snapshot<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut S,
    buf: &mut BytesMut,
    registry: &Registry,
    vote: VoteOf<TypeConfig>,
    meta: SnapshotMetaOf<TypeConfig>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let store = registry.store();
    let generation = store.begin_staging().await?;
    let mut items = 0u64;
    loop {
        let frame = tokio::time::timeout(SNAPSHOT_SILENCE, read_frame(socket, buf))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "snapshot transfer went silent",
                )
            })??;
        match frame {
            StreamFrame::SnapshotChunk(chunk) => {
                items += chunk.len() as u64;
                store.stage_chunk(generation, chunk).await?;
                metrics::counter!("corvid_snapshot_chunks_received_total").increment(1);
            }
            StreamFrame::SnapshotEnd => break,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "unexpected frame in a snapshot transfer",
                ))
            }
        }
    }
    let response = registry
        .install_staged_snapshot(vote, meta, generation)
        .await;
    tracing::info!(
        items,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "received a snapshot from the leader"
    );
    send(socket, &response).await
}

/// Serves one follower that has applied everything up to `after`, until the
/// connection fails.
pub async fn serve_follower<S: AsyncWrite + Unpin>(
    socket: &mut S,
    registry: &Registry,
    after: u64,
) -> std::io::Result<()> {
    metrics::gauge!("corvid_stream_followers").increment(1.0);
    let res = follow_loop(socket, registry, after).await;
    metrics::gauge!("corvid_stream_followers").decrement(1.0);
    res
}

async fn follow_loop<S: AsyncWrite + Unpin>(
    socket: &mut S,
    registry: &Registry,
    after: u64,
) -> std::io::Result<()> {
    let store = registry.store().clone();
    let mut applied_rx = store.watch_applied();
    let mut next = after + 1;
    loop {
        let applied = *applied_rx.borrow_and_update();
        if next <= applied {
            let s = store.clone();
            let records = tokio::task::spawn_blocking(move || {
                s.committed_records(next, applied, RECORDS_PER_FRAME)
            })
            .await
            .map_err(std::io::Error::other)??;
            match records {
                Some(records) => {
                    next = records.last().map_or(next, |r| r.log_id.index + 1);
                    metrics::counter!("corvid_stream_records_sent_total")
                        .increment(records.len() as u64);
                    send(
                        socket,
                        &StreamFrame::Records {
                            records,
                            master_applied: applied,
                        },
                    )
                    .await?;
                }
                None => {
                    next = send_snapshot(socket, &store, registry.stream_frame_delay()).await? + 1
                }
            }
            continue;
        }
        tokio::select! {
            changed = applied_rx.changed() => changed.map_err(std::io::Error::other)?,
            _ = tokio::time::sleep(HEARTBEAT) => {
                send(socket, &StreamFrame::Heartbeat {
                    master_applied: applied,
                    has_leader: registry.leader_is_fresh(),
                })
                .await?;
            }
        }
    }
}

/// Sends the current state in chunks; returns the index it reflects.
/// `chunk_delay` (TEST ONLY, normally zero) is a pause before each chunk, so
/// that tests can fail a master in the middle of a transfer.
async fn send_snapshot<S: AsyncWrite + Unpin>(
    socket: &mut S,
    store: &Store,
    chunk_delay: Duration,
) -> std::io::Result<u64> {
    let started = std::time::Instant::now();
    // The scan runs on a blocking thread over one RocksDB point-in-time
    // view; the channel holds two chunks, so memory stays bounded however
    // slowly the follower reads.
    let (tx, mut rx) = mpsc::channel(2);
    let s = store.clone();
    let scan = tokio::task::spawn_blocking(move || {
        s.scan_chunks(false, |part| {
            let frame = match part {
                Ok(meta) => StreamFrame::SnapshotBegin {
                    log_id: meta.last_log_id,
                },
                Err(entries) => StreamFrame::SnapshotChunk(entries),
            };
            tx.blocking_send(frame).is_ok()
        })
    });
    let mut index = 0;
    let mut sent = 0u64;
    while let Some(frame) = rx.recv().await {
        match &frame {
            StreamFrame::SnapshotBegin { log_id } => index = log_id.map_or(0, |l| l.index),
            StreamFrame::SnapshotChunk(c) => {
                sent += c.len() as u64;
                if !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
            }
            _ => {}
        }
        send(socket, &frame).await?;
    }
    scan.await.map_err(std::io::Error::other)??;
    send(socket, &StreamFrame::SnapshotEnd).await?;
    metrics::counter!("corvid_stream_snapshots_sent_total").increment(1);
    metrics::counter!("corvid_stream_snapshot_entries_sent_total").increment(sent);
    tracing::info!(
        index,
        mailboxes = sent,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "sent a snapshot down a log stream"
    );
    Ok(index)
}
