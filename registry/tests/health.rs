//! `/healthz` and `/readyz` on the metrics port of real `corvid-registry`
//! processes: a master is ready while it knows a fresh leader and has
//! applied what it knows committed; a replica while it has synchronised and
//! is not too far behind its master.

mod common;

use std::time::Duration;

use common::{activate, free_port, http_get, metric, wait_for, TestCluster};

/// The status code and the body of `GET path`.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let text = http_get(addr, path).await;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, body)
}

/// Waits up to `limit` for `GET /readyz` on `addr` to answer `code` with a
/// body containing `text`; panics with the last answer otherwise.
async fn wait_readyz(addr: &str, code: u16, text: &str, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = get(addr, "/readyz").await;
        if last.0 == code && last.1.contains(text) {
            return last.1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr}/readyz never answered {code} {text:?} in {limit:?}; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_is_ready_only_with_a_fresh_leader() {
    let mut cluster = TestCluster::start(3, "");
    let m1 = cluster.daemon(1).metrics.clone();
    // Up but not a cluster yet: alive, not ready, one line saying why.
    assert_eq!(get(&m1, "/healthz").await, (200, "ok\n".into()));
    let (code, body) = get(&m1, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: ") && body.ends_with('\n'),
        "{body:?}"
    );
    assert_eq!(body.lines().count(), 1, "{body:?}");

    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    for id in 1..=3 {
        let addr = cluster.daemon(id).metrics.clone();
        let body = wait_readyz(&addr, 200, "ready: leader", Duration::from_secs(15)).await;
        assert!(body.contains(&format!("leader {leader}")), "{body}");
        assert_eq!(metric(&addr, "corvid_raft_voters").await, Some(3.0));
        assert_eq!(metric(&addr, "corvid_server_has_leader").await, Some(1.0));
    }
    let mut c = cluster.client(leader).await;
    activate(&mut c, "user.ready").await;
    drop(c);

    // The survivor of a lost majority keeps its old vote, but has heard
    // from no leader lately: not ready, and has_leader drops to 0.
    let survivor = (1..=3).find(|&id| id != leader).unwrap();
    for id in (1..=3).filter(|&id| id != survivor) {
        cluster.kill(id);
    }
    let addr = cluster.daemon(survivor).metrics.clone();
    let body = wait_readyz(&addr, 503, "no leader", Duration::from_secs(10)).await;
    assert!(body.starts_with("not ready: "), "{body}");
    let dropped = wait_for(Duration::from_secs(10), || async {
        (metric(&addr, "corvid_server_has_leader").await == Some(0.0)).then_some(())
    })
    .await;
    assert!(dropped.is_some(), "has_leader stayed 1 without a quorum");
    assert_eq!(get(&addr, "/healthz").await.0, 200);

    // A majority again: ready again.
    let back = (1..=3).find(|&id| id != survivor).unwrap();
    cluster.restart(back);
    wait_readyz(&addr, 200, "ready: ", Duration::from_secs(20)).await;
}

/// A one-node cluster with small snapshots whose master pauses 3 s before
/// each snapshot chunk it streams, with `replica_toml` as the `[replica]`
/// section, and a replica of it that was away while the master wrote and
/// compacted past its position: it is visibly behind for those 3 s.
async fn replica_behind_a_slow_snapshot(replica_toml: &str) -> (TestCluster, common::Daemon) {
    let cluster = TestCluster::start(
        1,
        &format!(
            "snapshot_after_entries = 40\nkeep_log_entries = 5\n\
             unsafe_test_stream_frame_delay_ms = 3000\n[replica]\n{replica_toml}\n"
        ),
    );
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let mut c = cluster.client(1).await;
    activate(&mut c, "user.r0").await;
    let mupdate = format!("127.0.0.1:{}", free_port());
    let replica = cluster.replica("replica", &[1], &mupdate);
    wait_readyz(
        &replica.metrics,
        200,
        "0 entries behind",
        Duration::from_secs(15),
    )
    .await;
    replica.kill9();
    for i in 1..=120 {
        activate(&mut c, &format!("user.r{i}")).await;
    }
    let replica = cluster.replica("replica", &[1], &mupdate);
    (cluster, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_not_ready_before_its_first_sync() {
    // Masters not reachable at all: never synchronised, never ready.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let lonely = common::Daemon::start(
        &dir.path().join("lonely"),
        &["--role", "replica", "--masters", &nowhere],
    );
    assert_eq!(get(&lonely.metrics, "/healthz").await.0, 200);
    let body = wait_readyz(&lonely.metrics, 503, "first sync", Duration::from_secs(5)).await;
    assert_eq!(body.lines().count(), 1, "{body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_too_many_entries_behind_is_not_ready() {
    let (_cluster, replica) = replica_behind_a_slow_snapshot("ready_max_lag_entries = 5").await;
    let body = wait_readyz(
        &replica.metrics,
        503,
        "entries behind its master",
        Duration::from_secs(10),
    )
    .await;
    assert!(body.contains("(more than 5)"), "{body}");
    // The gauge is refreshed every second.
    let lag = wait_for(Duration::from_secs(3), || async {
        metric(&replica.metrics, "corvid_replica_lag_entries")
            .await
            .filter(|&lag| lag > 5.0)
    })
    .await;
    assert!(
        lag.is_some(),
        "the lag gauge should show the snapshot's distance"
    );
    // The snapshot arrives: caught up, ready.
    wait_readyz(&replica.metrics, 200, "ready: ", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_for_too_long_is_not_ready() {
    let (_cluster, replica) =
        replica_behind_a_slow_snapshot("ready_max_lag_entries = 1000000\nready_max_lag_secs = 1")
            .await;
    let body = wait_readyz(
        &replica.metrics,
        503,
        "behind its master for",
        Duration::from_secs(10),
    )
    .await;
    assert!(body.contains("(more than 1.0 s)"), "{body}");
    wait_readyz(&replica.metrics, 200, "ready: ", Duration::from_secs(30)).await;
}
