//! Replicas as real processes following real master processes: catch-up,
//! resuming with only the missed entries, snapshots when the log is
//! compacted, failover between masters, serving with every master down,
//! forwarded writes and UPDATE streams.

mod common;

use std::time::Duration;

use common::{activate, free_port, metric, wait_for, Daemon, TestCluster, ADMIN, READER};
use corvid_registry::mupdate::client::{line_entry, Client};
use corvid_registry::mupdate::codec::{Command, Status};

async fn login(addr: &str, user: (&str, &str)) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.authenticate_plain(user.0, user.1).await.unwrap();
    c
}

/// Waits until the replica at `addr` answers FIND `name` as `present`.
async fn replica_has(addr: &str, name: &str, present: bool) -> bool {
    wait_for(Duration::from_secs(20), || async {
        let mut c = Client::connect(addr).await.ok()?;
        c.authenticate_plain(READER.0, READER.1).await.ok()?;
        let found = c.find(name).await.ok()?.is_some();
        (found == present).then_some(())
    })
    .await
    .is_some()
}

async fn counter(d: &Daemon, name: &str) -> f64 {
    metric(&d.metrics, name).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_resumes_with_only_the_missed_entries() {
    let cluster = TestCluster::start(1, "");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let mut c = cluster.client(1).await;
    for i in 0..20 {
        activate(&mut c, &format!("user.r{i:02}")).await;
    }
    let port = format!("127.0.0.1:{}", free_port());
    let replica = cluster.replica("replica", &[1], &port);
    assert!(
        replica_has(&port, "user.r19", true).await,
        "initial catch-up"
    );
    assert_eq!(
        counter(&replica, "corvid_replica_snapshots_received_total").await,
        0.0,
        "the whole log is there: no snapshot needed"
    );

    // Read-only users read; administrators' writes are forwarded to the
    // masters and come back through the stream.
    let mut r = login(&port, READER).await;
    assert_eq!(r.list(None).await.unwrap().len(), 20);
    let denied = r
        .command(&Command::Delete {
            name: "user.r00".into(),
        })
        .await
        .unwrap();
    assert_eq!(denied.status, Status::No);
    let mut ra = login(&port, ADMIN).await;
    activate(&mut ra, "user.via-replica").await;
    assert!(c.find("user.via-replica").await.unwrap().is_some());
    assert!(replica_has(&port, "user.via-replica", true).await);

    // An UPDATE subscriber on the replica gets the dump, then each change.
    let mut sub = login(&port, READER).await;
    let tag = sub.send(&Command::Update { servers: vec![] });
    sub.flush().await.unwrap();
    let dump = sub.receive(&tag).await.unwrap().ok().unwrap();
    assert_eq!(dump.entries().len(), 21);
    activate(&mut c, "user.pushed").await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), sub.next_push())
        .await
        .expect("a push within 10 s")
        .unwrap();
    assert_eq!(line_entry(&pushed).unwrap().name, "user.pushed");

    // Stop the replica, write 30 more, restart it: exactly those 30 cross.
    drop((r, ra, sub));
    replica.kill9();
    for i in 0..30 {
        activate(&mut c, &format!("user.later{i:02}")).await;
    }
    let replica = cluster.replica("replica", &[1], &port);
    assert!(replica_has(&port, "user.later29", true).await, "resumed");
    let got = wait_for(Duration::from_secs(5), || async {
        let n = counter(&replica, "corvid_replica_records_received_total").await;
        (n >= 30.0).then_some(n)
    })
    .await;
    assert_eq!(got, Some(30.0), "only the missed entries cross the wire");
    assert_eq!(
        counter(&replica, "corvid_replica_snapshot_entries_received_total").await,
        0.0
    );
    assert_eq!(
        login(&port, READER).await.list(None).await.unwrap().len(),
        52
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_installs_a_snapshot_when_its_position_was_compacted() {
    let cluster = TestCluster::start(1, "snapshot_after_entries = 50\nkeep_log_entries = 5");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let mut c = cluster.client(1).await;
    for i in 0..120 {
        activate(&mut c, &format!("user.s{i:03}")).await;
    }
    let port = format!("127.0.0.1:{}", free_port());
    let replica = cluster.replica("replica", &[1], &port);
    assert!(replica_has(&port, "user.s119", true).await);
    replica.kill9();
    // The replica has at most what the master had applied by now.
    let master = cluster.daemon(1);
    let had = counter(master, "corvid_raft_applied_index").await;
    // While it is away: deletions and creations far past the kept log.
    for i in 0..10 {
        c.command(&Command::Delete {
            name: format!("user.s{i:03}"),
        })
        .await
        .unwrap()
        .ok()
        .unwrap();
    }
    for i in 0..150 {
        activate(&mut c, &format!("user.t{i:03}")).await;
    }
    // Snapshots are built and the log purged in the background: wait until
    // the replica's position is really gone from the master's log.
    let purged = wait_for(Duration::from_secs(20), || async {
        (counter(master, "corvid_raft_log_purged_index").await > had).then_some(())
    })
    .await;
    assert!(purged.is_some(), "the master compacted its log");
    let replica = cluster.replica("replica", &[1], &port);
    assert!(replica_has(&port, "user.t149", true).await);
    // The counter moves just after the snapshot's data becomes readable.
    let snapshots = wait_for(Duration::from_secs(5), || async {
        (counter(&replica, "corvid_replica_snapshots_received_total").await >= 1.0).then_some(())
    })
    .await;
    assert!(snapshots.is_some(), "the replica caught up by snapshot");
    let mut r = login(&port, READER).await;
    assert!(
        r.find("user.s000").await.unwrap().is_none(),
        "deleted while away"
    );
    assert_eq!(r.list(None).await.unwrap().len(), 260);
    assert_eq!(
        r.list(None).await.unwrap(),
        c.list(None).await.unwrap(),
        "the replica's state equals the master's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_fails_over_and_serves_while_every_master_is_down() {
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    cluster.leader(&[1, 2, 3]).await;
    let mut c = cluster.client(2).await;
    for i in 0..10 {
        activate(&mut c, &format!("user.f{i}")).await;
    }
    let port = format!("127.0.0.1:{}", free_port());
    // It follows node 1 first.
    let _replica = cluster.replica("replica", &[1, 2, 3], &port);
    assert!(replica_has(&port, "user.f9", true).await);

    // Node 1 goes: the replica moves to another master and keeps up.
    cluster.kill(1);
    let leader = cluster.leader(&[2, 3]).await;
    let mut c = cluster.client(leader).await;
    activate(&mut c, "user.after-failover").await;
    assert!(replica_has(&port, "user.after-failover", true).await);

    // Every master down: the replica still answers from its copy.
    drop(c);
    cluster.kill(2);
    cluster.kill(3);
    let mut r = login(&port, READER).await;
    assert!(r.find("user.f3").await.unwrap().is_some());
    assert_eq!(r.list(None).await.unwrap().len(), 11);
    // Writes through it fail with a reason, in bounded time.
    let mut ra = login(&port, ADMIN).await;
    let started = std::time::Instant::now();
    let refused = ra
        .command(&Command::Reserve {
            name: "user.nowhere".into(),
            location: "be1!default".into(),
        })
        .await
        .unwrap();
    assert_eq!(refused.status, Status::No, "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The masters return; the replica catches up.
    for id in 1..=3 {
        cluster.restart(id);
    }
    let leader = cluster.leader(&[1, 2, 3]).await;
    let mut c = cluster.client(leader).await;
    activate(&mut c, "user.back").await;
    assert!(replica_has(&port, "user.back", true).await);
}
