//! Raft snapshots travel in chunks, staged by the follower as they arrive
//! and swapped in whole: a learner killed in the middle of a transfer keeps
//! its old state, and converges once it is back.

mod common;

use std::time::Duration;

use common::{metric, names, wait_for, TestCluster};
use corvid_registry::model::{ClientTag, MailboxState, Outcome, RegistryCommand};
use corvid_registry::peer::{PeerClient, PeerRequest, PeerResponse};
use corvid_registry::store::Store;

const MAILBOXES: usize = 6000;
const PER_BATCH: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_killed_mid_snapshot_keeps_its_old_state_and_converges() {
    // Small snapshots, and a leader that pauses before each chunk it sends,
    // so that the transfer lasts long enough to be cut.
    let mut cluster = TestCluster::start(
        2,
        "snapshot_after_entries = 20\nkeep_log_entries = 5\nunsafe_test_stream_frame_delay_ms = 400",
    );
    cluster.init(1).await;
    assert_eq!(cluster.leader(&[1]).await, 1);
    let mut c = cluster.client(1).await;
    common::activate(&mut c, "user.old").await;
    cluster.make_learner(2, 1).await;
    let old_index = learner_caught_up(&cluster).await;
    cluster.kill(2);

    // While the learner is down: many mailboxes, in batches, and the log
    // behind them compacted, so the learner can only catch up by snapshot.
    let mut peer = PeerClient::new(cluster.spec(1).peer.clone());
    for b in 0..MAILBOXES / PER_BATCH {
        let batch = (0..PER_BATCH)
            .map(|i| RegistryCommand::Activate {
                name: format!("user.bulk{:05}", b * PER_BATCH + i),
                location: "be2!default".into(),
                acl: "anyone\tlrs\t".into(),
            })
            .collect();
        let request = PeerRequest::ClientWrite {
            client: ClientTag::once(),
            command: RegistryCommand::Batch(batch),
        };
        match peer.call(&request, Duration::from_secs(10)).await.unwrap() {
            PeerResponse::Write(Outcome::Batch(o)) => {
                assert!(o.iter().all(|o| *o == Outcome::Done))
            }
            other => panic!("{other:?}"),
        }
    }
    let purged = wait_for(Duration::from_secs(10), || async {
        metric(&cluster.daemon(1).metrics, "corvid_raft_log_purged_index")
            .await
            .filter(|&p| p > old_index as f64)
    })
    .await;
    assert!(purged.is_some(), "the leader did not compact its log");

    // Back, and killed once the first chunk is staged.
    cluster.restart(2);
    let staged = wait_for(Duration::from_secs(20), || async {
        metric(
            &cluster.daemon(2).metrics,
            "corvid_snapshot_chunks_received_total",
        )
        .await
        .filter(|&n| n >= 1.0)
    })
    .await;
    assert!(staged.is_some(), "no snapshot chunk reached the learner");
    cluster.kill(2);
    {
        // On disk: the old state, whole, and none of the staged chunk.
        let store = Store::open(&cluster.spec(2).data).unwrap();
        assert_eq!(store.applied_index().unwrap(), old_index);
        let (_, all) = store.scan(|_| true).unwrap();
        let all: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(all, ["user.old"]);
        assert_eq!(
            store.mailbox("user.old").unwrap().unwrap().state,
            MailboxState::Active
        );
    }

    // Restarted, the learner gets the whole snapshot, in several chunks,
    // and then holds everything.
    cluster.restart(2);
    learner_caught_up(&cluster).await;
    let chunks = metric(
        &cluster.daemon(2).metrics,
        "corvid_snapshot_chunks_received_total",
    )
    .await
    .unwrap_or(0.0);
    assert!(chunks >= 3.0, "{chunks} chunks");
    assert_eq!(
        metric(&cluster.daemon(2).metrics, "corvid_snapshot_installs_total").await,
        Some(1.0)
    );
    let mut c = cluster.client(2).await;
    let have = names(&mut c).await;
    assert_eq!(have.len(), MAILBOXES + 1);
    assert!(have.contains("user.old") && have.contains("user.bulk05999"));
}

/// Waits until node 2 has applied everything node 1 (the leader) applied;
/// returns that index.
async fn learner_caught_up(cluster: &TestCluster) -> u64 {
    wait_for(Duration::from_secs(30), || async {
        let leader = cluster.status(1).await?.applied_index;
        let learner = cluster.status(2).await?.applied_index;
        (leader > 0 && learner >= leader).then_some(learner)
    })
    .await
    .expect("the learner caught up with the leader")
}
