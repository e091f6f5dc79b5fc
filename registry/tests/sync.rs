//! Consistency points across nodes, as real processes: NOOP on an UPDATE
//! stream of a follower or a replica pushes every change the cluster
//! committed before it (a Cyrus frontend's `kick_mupdate` relies on it),
//! and a node that has no leader says so quickly instead of hanging.

mod common;

use std::time::{Duration, Instant};

use common::{activate, free_port, wait_for, TestCluster, READER};
use corvid_registry::mupdate::client::{line_entry, Client};
use corvid_registry::mupdate::codec::{Command, Status};

async fn subscribe(addr: &str) -> Client {
    let mut c = wait_for(Duration::from_secs(20), || async {
        let mut c = Client::connect(addr).await.ok()?;
        c.authenticate_plain(READER.0, READER.1).await.ok()?;
        Some(c)
    })
    .await
    .expect("the server answers");
    let tag = c.send(&Command::Update { servers: vec![] });
    c.flush().await.unwrap();
    c.receive(&tag).await.unwrap().ok().unwrap();
    c
}

/// Sends NOOP and returns the names pushed before its OK.
async fn noop(c: &mut Client) -> Vec<String> {
    let reply = c.command(&Command::Noop).await.unwrap().ok().unwrap();
    reply
        .lines
        .iter()
        .filter_map(line_entry)
        .map(|e| e.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_on_a_follower_and_a_replica_pushes_what_was_just_committed() {
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let replica_addr = format!("127.0.0.1:{}", free_port());
    let _replica = cluster.replica("replica", &[follower], &replica_addr);
    let mut writer = cluster.client(leader).await;
    activate(&mut writer, "user.warmup").await;

    let mut on_follower = subscribe(&cluster.spec(follower).mupdate).await;
    let mut on_replica = subscribe(&replica_addr).await;
    // Whatever the warm-up left in flight.
    noop(&mut on_follower).await;
    noop(&mut on_replica).await;

    const TRIALS: usize = 1000;
    let (mut follower_ok, mut replica_ok) = (0, 0);
    for i in 0..TRIALS {
        let name = format!("user.sync{i:04}");
        activate(&mut writer, &name).await;
        follower_ok += usize::from(noop(&mut on_follower).await.contains(&name));
        replica_ok += usize::from(noop(&mut on_replica).await.contains(&name));
    }
    assert_eq!(
        (follower_ok, replica_ok),
        (TRIALS, TRIALS),
        "the MAILBOX line comes before NOOP's OK in every trial"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_leader_refuses_within_about_an_election() {
    // The write timeout is 3 s in test clusters.
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    cluster.leader(&[1, 2, 3]).await;
    let mut c = cluster.client(3).await;
    activate(&mut c, "user.before").await;
    cluster.kill(1);
    cluster.kill(2);
    // Node 3 is alone: it may still believe in the old leader for a moment.
    let started = Instant::now();
    let refused = c
        .command(&Command::Reserve {
            name: "user.nowhere".into(),
            location: "be1!default".into(),
        })
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(refused.status, Status::No, "{refused:?}");
    assert!(
        refused.text.contains("no leader"),
        "the reason is given: {}",
        refused.text
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "refused after {elapsed:?}, well before the 3 s write timeout"
    );
    let started = Instant::now();
    let find = c
        .command(&Command::Find {
            name: "user.before".into(),
        })
        .await
        .unwrap();
    assert_eq!(find.status, Status::No, "{find:?}");
    assert!(find.text.contains("no leader"), "{}", find.text);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_says_it_is_not_a_member() {
    use corvid_registry::peer::AdminRequest;
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let gone = (1..=3).find(|&i| i != leader).unwrap();
    let mut c = cluster.client(gone).await;
    activate(&mut c, "user.before").await;
    cluster
        .admin(leader, AdminRequest::Remove { id: gone })
        .await
        .unwrap();
    // Poll, within a deadline, until the node has applied its removal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = None;
    while refused.is_none() && Instant::now() < deadline {
        let r = c
            .command(&Command::Reserve {
                name: "user.after".into(),
                location: "be1!default".into(),
            })
            .await
            .unwrap();
        if r.status == Status::No && r.text.contains("not a member of the registry cluster") {
            refused = Some(r);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(refused.is_some(), "the removed node says why it refuses");
    let status = cluster.status(gone).await.unwrap();
    assert!(!status.member, "cluster status shows it: {status:?}");
    assert!(cluster.status(leader).await.unwrap().member);
}
