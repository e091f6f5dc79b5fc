//! Pooled peer connections that died with a restarted node (issue 9,
//! section 6): a write forwarded over one is retried on a fresh connection
//! and the client gets its OK at the first attempt, never a NO. Real
//! processes; the node that forwards keeps its pool across the restart of
//! the node it forwards to, which comes back at the same address and leads
//! again (a one-voter cluster, so the test does not depend on who wins an
//! election).

mod common;

use std::time::Duration;

use common::{free_port, metric, wait_for, TestCluster, ADMIN, READER};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};

async fn login(addr: &str, user: (&str, &str)) -> Client {
    wait_for(Duration::from_secs(20), || async {
        let mut c = Client::connect(addr).await.ok()?;
        c.authenticate_plain(user.0, user.1).await.ok()?;
        Some(c)
    })
    .await
    .expect("the server answers")
}

/// ACTIVATE `name`, and the server's answer (status and text).
async fn try_activate(c: &mut Client, name: &str) -> (Status, String) {
    let r = c
        .command(&Command::Activate {
            name: name.into(),
            location: "be1!default".into(),
            acl: "anyone\tlrs\t".into(),
        })
        .await
        .unwrap();
    (r.status, r.text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_forwards_at_once_after_the_leader_restarted() {
    let mut cluster = TestCluster::start(2, "");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    cluster.make_learner(2, 1).await;
    // The learner's writes go to the leader over its connection pool.
    let mut c = login(&cluster.spec(2).mupdate, ADMIN).await;
    assert_eq!(try_activate(&mut c, "user.before").await.0, Status::Ok);
    let before = metric(
        &cluster.daemon(2).metrics,
        "corvid_raft_forward_retries_total",
    )
    .await
    .unwrap_or(0.0);

    // The leader restarts at the same address and leads again (the only
    // voter); the learner's pooled connection to it is dead.
    cluster.kill(1);
    cluster.restart(1);
    cluster.leader(&[1, 2]).await;
    let (status, text) = try_activate(&mut c, "user.after").await;
    assert_eq!(status, Status::Ok, "the first attempt succeeds: {text}");
    let mut leader = cluster.client(1).await;
    assert!(leader.find("user.after").await.unwrap().is_some());
    // Retried once in the pool, on a fresh connection, not by the slower
    // whole-write retry loop.
    let stale = metric(
        &cluster.daemon(2).metrics,
        "corvid_peer_pool_stale_retries_total",
    )
    .await
    .unwrap_or(0.0);
    assert!(
        stale >= 1.0,
        "the dead pooled connection was met and replaced"
    );
    let after = metric(
        &cluster.daemon(2).metrics,
        "corvid_raft_forward_retries_total",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(after, before, "no retry of the whole forwarded write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_forwards_at_once_after_its_master_restarted() {
    let mut cluster = TestCluster::start(1, "");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let port = format!("127.0.0.1:{}", free_port());
    let replica = cluster.replica("replica", &[1], &port);
    // Its writes go to its one master over its connection pool.
    let mut c = login(&port, ADMIN).await;
    assert_eq!(try_activate(&mut c, "user.before").await.0, Status::Ok);

    cluster.kill(1);
    cluster.restart(1);
    cluster.leader(&[1]).await;
    let (status, text) = try_activate(&mut c, "user.after").await;
    assert_eq!(status, Status::Ok, "the first attempt succeeds: {text}");
    let stale = metric(&replica.metrics, "corvid_peer_pool_stale_retries_total")
        .await
        .unwrap_or(0.0);
    assert!(
        stale >= 1.0,
        "the dead pooled connection was met and replaced"
    );
    // And it comes back through the stream.
    let seen = wait_for(Duration::from_secs(20), || async {
        let mut r = login(&port, READER).await;
        r.find("user.after").await.ok()?
    })
    .await;
    assert!(seen.is_some());
}
