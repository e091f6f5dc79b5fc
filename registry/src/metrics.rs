//! Prometheus metrics: the recorder, histogram buckets, and a minimal HTTP
//! endpoint serving `/metrics`, `/healthz` and `/readyz` on a listener the
//! caller bound (so that tests can use port 0 and learn the address).
//!
//! Every metric is named with a `corvid_` prefix and a unit suffix; the list
//! is in `docs/src/metrics.md`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
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
    describe_gauge!(
        "corvid_server_has_leader",
        "1 when a leader was heard from within two election timeouts"
    );
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
        "corvid_snapshot_failures_total",
        "Snapshots that failed to build, send or install, by stage"
    );
    describe_gauge!(
        "corvid_raft_voters",
        "Voting members in the membership this node knows"
    );
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

/// The stages [`snapshot_failed`] counts.
const SNAPSHOT_STAGES: [&str; 3] = ["build", "send", "install"];

/// Counts a snapshot that failed at `stage` (`build`, `send` to a peer,
/// `install` of one received from the leader).
pub fn snapshot_failed(stage: &'static str) {
    metrics::counter!("corvid_snapshot_failures_total", "stage" => stage).increment(1);
}

/// Shows the snapshot counters at 0 from the start: Prometheus's
/// `increase()` misses the first event of a series that appears at 1.
pub fn register_snapshot_counters() {
    metrics::counter!("corvid_snapshot_builds_total").increment(0);
    metrics::counter!("corvid_snapshot_installs_total").increment(0);
    for stage in SNAPSHOT_STAGES {
        metrics::counter!("corvid_snapshot_failures_total", "stage" => stage).increment(0);
    }
}

/// Most concurrent requests on the metrics port; more are closed at once.
const MAX_METRICS_CONNECTIONS: usize = 16;

/// The answer of a readiness check: `Ok(detail)` when ready, `Err(reason)`
/// when not. Either text is one line, sent as the `/readyz` body.
pub type ReadyResult = Result<String, String>;

/// Asked on every `GET /readyz`: whether this process should receive
/// traffic now (see `docs/src/monitoring.md`). The future must finish
/// promptly; the endpoint gives it [`READY_CHECK_TIMEOUT`].
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, ReadyResult> + Send + Sync>;

/// Longest a readiness check may take before `/readyz` answers 503.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request on the metrics port asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
}

/// Routes a request by its first line (`GET /path HTTP/1.x`). A query
/// string is ignored; methods other than GET are not served.
fn route(request_line: &[u8]) -> Route {
    let line = request_line.strip_suffix(b"\r").unwrap_or(request_line);
    let mut words = line.split(|&b| b == b' ');
    if words.next() != Some(b"GET".as_slice()) {
        return Route::NotFound;
    }
    let target = words.next().unwrap_or_default();
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => Route::Metrics,
        b"/healthz" => Route::Healthz,
        b"/readyz" => Route::Readyz,
        _ => Route::NotFound,
    }
}

/// One line (no line breaks, bounded) for a health endpoint's body.
fn one_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    line.push('\n');
    line
}

/// Serves `GET /metrics`, `GET /healthz` (200 while the process runs) and
/// `GET /readyz` (200 or 503 as `ready` says, with a one-line reason) on
/// `listener` for as long as the task runs. `accept()` errors are counted
/// and retried after a pause.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, ready: Readiness) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut listener = crate::net::Acceptor::new(listener, "metrics");
    loop {
        let (mut socket, _) = listener.accept().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let handle = handle.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 8192];
            let mut used = 0;
            // Read the request head (bounded), ignoring any body.
            let head = loop {
                let read =
                    tokio::time::timeout(REQUEST_TIMEOUT, socket.read(&mut buf[used..])).await;
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
            let (status, content_type, body) = match route(line) {
                Route::Metrics => ("200 OK", "text/plain; version=0.0.4", handle.render()),
                Route::Healthz => ("200 OK", "text/plain", "ok\n".to_string()),
                Route::Readyz => {
                    let answer = tokio::time::timeout(READY_CHECK_TIMEOUT, ready())
                        .await
                        .unwrap_or_else(|_| Err("readiness check timed out".into()));
                    match answer {
                        Ok(detail) => (
                            "200 OK",
                            "text/plain",
                            one_line(&format!("ready: {detail}")),
                        ),
                        Err(reason) => (
                            "503 Service Unavailable",
                            "text/plain",
                            one_line(&format!("not ready: {reason}")),
                        ),
                    }
                }
                Route::NotFound => (
                    "404 Not Found",
                    "text/plain",
                    "only GET /metrics, /healthz and /readyz are served here\n".to_string(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(resp.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_request_line() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r"), Route::Metrics);
        assert_eq!(route(b"GET /metrics"), Route::Metrics);
        assert_eq!(route(b"GET /healthz HTTP/1.0"), Route::Healthz);
        assert_eq!(route(b"GET /readyz?verbose HTTP/1.1\r"), Route::Readyz);
        assert_eq!(route(b"POST /readyz HTTP/1.1\r"), Route::NotFound);
        assert_eq!(route(b"GET /readyzz HTTP/1.1\r"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1\r"), Route::NotFound);
        assert_eq!(route(b""), Route::NotFound);
    }

    #[test]
    fn reasons_are_one_bounded_line() {
        assert_eq!(one_line("a\nb\r"), "a b \n");
        assert_eq!(one_line(&"x".repeat(10_000)).len(), 401);
    }
}
