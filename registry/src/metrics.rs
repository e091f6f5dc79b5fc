//! Prometheus metrics: the recorder, histogram buckets, and a minimal HTTP
//! endpoint serving `/metrics` on a listener the caller bound (so that tests
//! can use port 0 and learn the address).
//!
//! Every metric is named with a `corvid_` prefix and a unit suffix; the list
//! is in `docs/src/metrics.md`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Latency buckets in seconds, from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Installs the global recorder. Call once per process.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("corvid_raft_term", "Current Raft term");
    describe_gauge!(
        "corvid_raft_leader_id",
        "Node id of the known leader (0 when none)"
    );
    describe_gauge!("corvid_server_has_leader", "1 when a leader is known");
    describe_counter!(
        "corvid_registry_duplicate_requests_total",
        "Retried requests answered from the client session table"
    );
    describe_counter!(
        "corvid_registry_sessions_expired_total",
        "Client sessions expired by the registry clock"
    );
    describe_counter!(
        "corvid_peer_pool_stale_retries_total",
        "Peer requests retried on a fresh connection after a pooled one failed"
    );
    describe_counter!(
        "corvid_raft_forward_retries_total",
        "Forwarded writes retried after an I/O error"
    );
    describe_counter!(
        "corvid_replica_sync_timeouts_total",
        "Replica sync points that did not reach the cluster's read index in time"
    );
    describe_counter!(
        "corvid_mupdate_noop_sync_timeouts_total",
        "NOOPs on UPDATE streams answered without reaching the commit point"
    );
    describe_gauge!("corvid_server_is_leader", "1 when this node is the leader");
    describe_counter!(
        "corvid_server_leader_changes_seen_total",
        "Leader changes seen by this node"
    );
    describe_gauge!("corvid_raft_last_log_index", "Index of the last log entry");
    describe_gauge!(
        "corvid_raft_applied_index",
        "Index of the last applied log entry"
    );
    describe_histogram!(
        "corvid_raft_commit_duration_seconds",
        Unit::Seconds,
        "Write latency from proposal to applied"
    );
    describe_counter!(
        "corvid_raft_log_entries_appended_total",
        "Log entries made durable"
    );
    describe_histogram!(
        "corvid_disk_wal_fsync_duration_seconds",
        Unit::Seconds,
        "Duration of WAL fsyncs"
    );
    describe_gauge!(
        "corvid_disk_sst_bytes",
        Unit::Bytes,
        "Size of RocksDB's SST files"
    );
    describe_counter!("corvid_snapshot_builds_total", "Snapshots built");
    describe_histogram!(
        "corvid_snapshot_build_duration_seconds",
        Unit::Seconds,
        "Snapshot build time"
    );
    describe_counter!("corvid_snapshot_installs_total", "Snapshots installed");
    describe_counter!(
        "corvid_mupdate_commands_total",
        "MUPDATE commands by command and result"
    );
    describe_histogram!(
        "corvid_mupdate_command_duration_seconds",
        Unit::Seconds,
        "MUPDATE command latency"
    );
    describe_gauge!(
        "corvid_mupdate_connections_open",
        "Open MUPDATE connections"
    );
    describe_counter!(
        "corvid_mupdate_connections_rejected_total",
        "Connections refused at the limit"
    );
    describe_gauge!(
        "corvid_mupdate_update_subscribers",
        "Connections streaming UPDATE"
    );
    describe_counter!("corvid_mupdate_auth_total", "Authentications by result");
    describe_gauge!(
        "corvid_mupdate_connections_max",
        "MUPDATE connection cap in effect (after fitting the descriptor limit)"
    );
    describe_gauge!(
        "corvid_mupdate_connections_unauthenticated",
        "Open MUPDATE connections that have not authenticated yet"
    );
    describe_counter!(
        "corvid_mupdate_login_timeouts_total",
        "Connections closed for not authenticating within mupdate.login_timeout_secs"
    );
    describe_counter!(
        "corvid_accept_errors_total",
        "Failed accept() calls by listener (mupdate, peer, metrics); the listener pauses and goes on"
    );
    describe_gauge!("corvid_peer_connections_open", "Open peer-port connections");
    describe_counter!(
        "corvid_peer_connections_rejected_total",
        "Peer-port connections closed at raft.max_peer_connections"
    );
}

/// Most concurrent `/metrics` requests; more are closed at once.
const MAX_METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` for as long as the task runs.
/// `accept()` errors are counted and retried after a pause.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut listener = crate::net::Acceptor::new(listener, "metrics");
    loop {
        let (mut socket, _) = listener.accept().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 8192];
            let mut used = 0;
            // Read the request head (bounded), ignoring any body.
            let head = loop {
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    socket.read(&mut buf[used..]),
                )
                .await;
                match read {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => used += n,
                }
                if buf[..used].windows(4).any(|w| w == b"\r\n\r\n")
                    || buf[..used].windows(2).any(|w| w == b"\n\n")
                {
                    break &buf[..used];
                }
                if used == buf.len() {
                    return;
                }
            };
            let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
            let ok = line.starts_with(b"GET /metrics ")
                || line.starts_with(b"GET /metrics\r")
                || line == b"GET /metrics";
            let (status, body) = if ok {
                ("200 OK", handle.render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(resp.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
