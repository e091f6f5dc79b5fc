//! A replica whose master dies in the middle of a snapshot transfer, as
//! real processes (issue 9, section 3): the replica stages the incoming
//! snapshot aside, so until it is complete FIND, LIST and UPDATE keep
//! serving the old, whole state, and an UPDATE subscriber (a Cyrus slave)
//! never sees mailboxes vanish. The master's test-only stream throttle
//! (`--unsafe-test-stream-frame-delay-ms`) makes the transfer slow enough to
//! kill the master while the replica holds part of the snapshot.

mod common;

use std::time::{Duration, Instant};

use common::{activate, free_port, metric, wait_for, Daemon, TestCluster, READER};
use corvid_registry::model::{ClientTag, Outcome, RegistryCommand};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, ServerLine};
use corvid_registry::peer::{PeerClient, PeerRequest, PeerResponse};

/// Mailboxes on the master before the replica first syncs: ten snapshot
/// chunks of 2,048.
const MAILBOXES: usize = 20_480;
/// Pause of the throttled master before each snapshot chunk.
const CHUNK_DELAY_MS: &str = "500";

fn name(i: usize) -> String {
    format!("user.b{i:05}")
}

/// ACTIVATEs `names` at `be1!default` through the peer port, 1,000 to a
/// log entry (the fastest way in: one Raft commit per thousand mailboxes).
async fn bulk_activate(peer: &str, names: impl Iterator<Item = String>) {
    let mut c = PeerClient::new(peer);
    let names: Vec<String> = names.collect();
    for part in names.chunks(1000) {
        let command = RegistryCommand::Batch(
            part.iter()
                .map(|n| RegistryCommand::Activate {
                    name: n.clone(),
                    location: "be1!default".into(),
                    acl: "anyone\tlrs\t".into(),
                })
                .collect(),
        );
        let answer = c
            .call(
                &PeerRequest::ClientWrite {
                    client: ClientTag::once(),
                    command,
                },
                Duration::from_secs(30),
            )
            .await
            .expect("the master takes the batch");
        match answer {
            PeerResponse::Write(Outcome::Batch(outcomes)) => {
                assert!(outcomes.iter().all(|o| matches!(o, Outcome::Done)))
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

async fn login(addr: &str) -> Client {
    wait_for(Duration::from_secs(20), || async {
        let mut c = Client::connect(addr).await.ok()?;
        c.authenticate_plain(READER.0, READER.1).await.ok()?;
        Some(c)
    })
    .await
    .expect("the replica answers")
}

async fn counter(d: &Daemon, name: &str) -> f64 {
    metric(&d.metrics, name).await.unwrap_or(0.0)
}

/// The location FIND gives for `name` on `addr` (`None`: no such mailbox).
async fn location(addr: &str, name: &str) -> Option<String> {
    login(addr)
        .await
        .find(name)
        .await
        .unwrap()
        .map(|e| e.location)
}

fn deletes(lines: &[ServerLine]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| match l {
            ServerLine::Delete { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_keeps_its_whole_state_when_the_master_dies_mid_snapshot() {
    let started = Instant::now();
    let mut cluster = TestCluster::start(1, "snapshot_after_entries = 50\nkeep_log_entries = 5");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let peer = cluster.spec(1).peer.clone();
    bulk_activate(&peer, (0..MAILBOXES).map(name)).await;

    // The replica syncs everything, then stops.
    let port = format!("127.0.0.1:{}", free_port());
    let replica = cluster.replica("replica", &[1], &port);
    let synced = wait_for(Duration::from_secs(60), || async {
        // "NO replica is synchronising" until its first sync is complete.
        let mut c = Client::connect(&port).await.ok()?;
        c.authenticate_plain(READER.0, READER.1).await.ok()?;
        c.find(&name(MAILBOXES - 1)).await.ok()?
    })
    .await;
    assert!(synced.is_some(), "the replica synced");
    replica.kill9();
    let master = cluster.daemon(1);
    let had = counter(master, "corvid_raft_applied_index").await;

    // While it is away: deletions, moves and creations, far past the kept
    // log, so that it can only come back by snapshot.
    let mut c = cluster.client(1).await;
    for i in 0..10 {
        c.command(&Command::Delete { name: name(i) })
            .await
            .unwrap()
            .ok()
            .unwrap();
    }
    for i in 10..20 {
        c.command(&Command::Activate {
            name: name(i),
            location: "be2!default".into(),
            acl: "anyone\tlrs\t".into(),
        })
        .await
        .unwrap()
        .ok()
        .unwrap();
    }
    for i in 0..100 {
        activate(&mut c, &format!("user.new{i:03}")).await;
    }
    let purged = wait_for(Duration::from_secs(30), || async {
        (counter(master, "corvid_raft_log_purged_index").await > had).then_some(())
    })
    .await;
    assert!(purged.is_some(), "the master compacted its log");
    let mut expected_new = names_of(c.list(None).await.unwrap());
    drop(c);

    // The master comes back throttled; so does the replica, which starts
    // receiving the snapshot. An UPDATE subscriber attaches meanwhile.
    cluster.kill(1);
    cluster.restart_with(1, &["--unsafe-test-stream-frame-delay-ms", CHUNK_DELAY_MS]);
    cluster.leader(&[1]).await;
    let replica = cluster.replica("replica", &[1], &port);
    let mut sub = login(&port).await;
    let tag = sub.send(&Command::Update { servers: vec![] });
    sub.flush().await.unwrap();
    let old = names_of(sub.receive(&tag).await.unwrap().ok().unwrap().entries());
    assert_eq!(
        old.len(),
        MAILBOXES,
        "the subscriber's dump is the old list"
    );

    // Mid-snapshot: part of it received, most of it still to come.
    let total = expected_new.len() as f64;
    let mid = wait_for(Duration::from_secs(30), || async {
        let got = counter(&replica, "corvid_replica_snapshot_entries_received_total").await;
        (got > 0.0 && got < total - 2048.0).then_some(got)
    })
    .await;
    let received = mid.expect("the replica is in the middle of the snapshot");
    cluster.kill(1);
    // The replica has noticed: its stream is down.
    let noticed = wait_for(Duration::from_secs(10), || async {
        (counter(&replica, "corvid_replica_connected").await == 0.0).then_some(())
    })
    .await;
    assert!(noticed.is_some(), "the replica lost its master");
    assert_eq!(
        counter(&replica, "corvid_replica_snapshots_received_total").await,
        0.0,
        "no snapshot was completed"
    );

    // FIND answers from the old state: the moved mailbox at its old place,
    // the deleted one still there, the new ones not yet.
    assert_eq!(
        location(&port, &name(10)).await.as_deref(),
        Some("be1!default")
    );
    assert_eq!(
        location(&port, &name(0)).await.as_deref(),
        Some("be1!default")
    );
    assert_eq!(location(&port, "user.new000").await, None);
    // The subscriber was told nothing (NOOP pushes whatever is pending
    // before its OK; no master answers, so it answers after at most 1 s).
    let reply = sub.command(&Command::Noop).await.unwrap().ok().unwrap();
    assert_eq!(deletes(&reply.lines), Vec::<String>::new());
    assert!(reply.lines.is_empty(), "nothing pushed: {:?}", reply.lines);
    // A Cyrus slave that resyncs now gets the whole old list.
    let mut fresh = login(&port).await;
    let tag = fresh.send(&Command::Update { servers: vec![] });
    fresh.flush().await.unwrap();
    let again = names_of(fresh.receive(&tag).await.unwrap().ok().unwrap().entries());
    assert_eq!(again, old, "a fresh UPDATE dumps the whole old list");
    assert_eq!(
        login(&port).await.list(None).await.unwrap().len(),
        MAILBOXES
    );
    drop(fresh);

    // The master returns unthrottled: the replica completes a snapshot and
    // serves the new state.
    cluster.restart(1);
    cluster.leader(&[1]).await;
    let done = wait_for(Duration::from_secs(60), || async {
        (counter(&replica, "corvid_replica_snapshots_received_total").await >= 1.0).then_some(())
    })
    .await;
    assert!(done.is_some(), "the replica completed a snapshot");
    assert_eq!(
        location(&port, &name(10)).await.as_deref(),
        Some("be2!default")
    );
    assert_eq!(location(&port, &name(0)).await, None);
    let mut r = login(&port).await;
    let mut now = names_of(r.list(None).await.unwrap());
    now.sort();
    expected_new.sort();
    assert_eq!(now, expected_new, "the replica's state is the master's");
    let mut m = cluster.client(1).await;
    assert_eq!(r.list(None).await.unwrap(), m.list(None).await.unwrap());

    // The old subscriber's state was replaced: it is told to resynchronise
    // with a BYE that reaches it before the connection closes, and it was
    // never sent a DELETE.
    let mut pushed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let bye = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next_push()).await {
            Err(_) => panic!("neither BYE nor EOF within 20 s; got {pushed:?}"),
            Ok(Ok(ServerLine::Bye(text))) => break Some(text),
            Ok(Ok(line)) => pushed.push(line),
            Ok(Err(_)) => break None,
        }
    };
    assert!(
        bye.is_some(),
        "a BYE before the stream closed; got {pushed:?}"
    );
    assert_eq!(deletes(&pushed), Vec::<String>::new());
    eprintln!(
        "killed the master with {received} of {total} snapshot items received; test took {:?}",
        started.elapsed()
    );
}

fn names_of(entries: Vec<corvid_registry::model::MailboxEntry>) -> Vec<String> {
    entries.into_iter().map(|e| e.name).collect()
}
