//! Multi-node registries: real `corvid-registry` processes on 127.0.0.1,
//! each with its own RocksDB, talking Raft over TCP.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metric, names, wait_for, TestCluster, ADMIN};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};
use corvid_registry::peer::{AdminRequest, PeerClient, PeerRequest};

fn activate(name: &str) -> Command {
    Command::Activate {
        name: name.into(),
        location: "be1!default".into(),
        acl: "anyone\tlrs\t".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_forward_writes_and_read_linearizably_anywhere() {
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|&i| i != leader).unwrap();

    // A write through a follower is forwarded to the leader.
    let mut c = cluster.client(follower).await;
    let r = c.command(&activate("user.fwd")).await.unwrap();
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert!(
        metric(
            &cluster.daemon(follower).metrics,
            "corvid_raft_forwarded_writes_total"
        )
        .await
            >= Some(1.0)
    );
    // Cyrus semantics hold through forwarding.
    let r = c
        .command(&Command::Reserve {
            name: "user.fwd".into(),
            location: "be2!default".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.text.as_str()),
        (Status::No, "mailbox already exists")
    );
    // Every node answers FIND with the write, at once (read index).
    for id in 1..=3 {
        let mut c = cluster.client(id).await;
        assert!(c.find("user.fwd").await.unwrap().is_some(), "node {id}");
    }
    // Concurrent writes through the follower leave in shared batches, and
    // each client still gets its own answer.
    let metrics = cluster.daemon(follower).metrics.clone();
    let batches = || async {
        (
            metric(&metrics, "corvid_raft_forwarded_writes_total")
                .await
                .unwrap_or(0.0),
            metric(&metrics, "corvid_raft_forward_batches_total")
                .await
                .unwrap_or(0.0),
        )
    };
    let (writes_before, batches_before) = batches().await;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let mut c = cluster.client(follower).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..8 {
                let r = c
                    .command(&activate(&format!("user.many{t}.{i}")))
                    .await
                    .unwrap();
                assert_eq!(r.status, Status::Ok, "{r:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (writes, sent) = batches().await;
    let (writes, sent) = (writes - writes_before, sent - batches_before);
    assert!(writes >= 256.0, "{writes} forwarded");
    assert!(
        sent < writes,
        "{writes} forwarded writes went in {sent} batches"
    );
    let mut c = cluster.client(leader).await;
    assert!(c.find("user.many31.7").await.unwrap().is_some());
    let s = cluster.status(leader).await.unwrap();
    assert_eq!(s.voters, vec![1, 2, 3]);
    assert_eq!(s.matched.len(), 3, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_elects_a_new_leader_and_writes_resume() {
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let old = cluster.leader(&[1, 2, 3]).await;
    let other = (1..=3).find(|&i| i != old).unwrap();
    let mut c = cluster.client(other).await;
    c.command(&activate("user.before"))
        .await
        .unwrap()
        .ok()
        .unwrap();

    cluster.kill(old);
    let killed = Instant::now();
    let rest: Vec<u64> = (1..=3).filter(|&i| i != old).collect();
    let new = cluster.leader(&rest).await;
    assert_ne!(new, old);
    // Writes resume through either survivor.
    let mut i = 0;
    let resumed = wait_for(Duration::from_secs(10), || {
        i += 1;
        let name = format!("user.after{i}");
        let addr = cluster.spec(rest[0]).mupdate.clone();
        async move {
            let mut c = Client::connect(&addr).await.ok()?;
            c.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
            (c.command(&activate(&name)).await.ok()?.status == Status::Ok).then_some(())
        }
    })
    .await;
    assert!(
        resumed.is_some(),
        "writes did not resume after the leader was killed"
    );
    eprintln!(
        "writes resumed {:?} after kill -9 of the leader",
        killed.elapsed()
    );

    // The old leader comes back as a follower and catches up.
    cluster.restart(old);
    let mut c = cluster.client(old).await;
    let seen = wait_for(Duration::from_secs(10), || async {
        let mut c = Client::connect(&cluster.spec(old).mupdate).await.ok()?;
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
        c.find("user.after1").await.ok()?
    })
    .await;
    assert!(seen.is_some(), "restarted node did not catch up");
    assert!(c.find("user.before").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_minority_does_not_stop_writes_but_a_majority_does() {
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();

    cluster.kill(followers[0]);
    let mut c = cluster.client(leader).await;
    c.command(&activate("user.minority"))
        .await
        .unwrap()
        .ok()
        .unwrap();

    cluster.kill(followers[1]);
    // No quorum: a clear NO within the bounded write timeout, never a hang.
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        c.command(&activate("user.noquorum")),
    )
    .await
    .expect("the write is answered in bounded time")
    .unwrap();
    assert_eq!(r.status, Status::No, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        c.command(&Command::Find {
            name: "user.minority".into(),
        }),
    )
    .await
    .expect("the read is answered in bounded time")
    .unwrap();
    assert_eq!(r.status, Status::No, "{r:?}");
    assert!(r.text.contains("no leader"), "the refusal says why: {r:?}");

    // The majority returns: writes resume, nothing acknowledged was lost.
    cluster.restart(followers[0]);
    cluster.restart(followers[1]);
    let ok = wait_for(Duration::from_secs(15), || async {
        let mut c = Client::connect(&cluster.spec(followers[0]).mupdate)
            .await
            .ok()?;
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
        (c.command(&activate("user.back")).await.ok()?.status == Status::Ok).then_some(c)
    })
    .await;
    let mut c = ok.expect("writes resume when the majority returns");
    assert!(c.find("user.minority").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_load_and_snapshot_install_to_a_new_node() {
    let mut cluster = TestCluster::start(3, "snapshot_after_entries = 100\nkeep_log_entries = 10");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let mut c = cluster.client(leader).await;
    for i in 0..300 {
        c.command(&activate(&format!("user.pre{i:03}")))
            .await
            .unwrap()
            .ok()
            .unwrap();
    }

    // A writer keeps going through the whole membership change.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let addr = cluster.spec(leader).mupdate.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(&addr).await.unwrap();
            c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
            let mut failures = 0;
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("user.load{i:05}");
                match c.command(&activate(&name)).await {
                    Ok(r) if r.status == Status::Ok => {
                        acked.lock().unwrap().insert(name);
                    }
                    _ => failures += 1,
                }
            }
            failures
        })
    };

    // Node 4 joins as a learner: the log it needs is compacted, so it gets
    // the leader's snapshot, then becomes a voter.
    let new = cluster.add_learner(1).await;
    cluster
        .admin(2, AdminRequest::Promote { id: new })
        .await
        .unwrap();
    // The counter is exported at 0 from the start: wait for the install.
    let installs = wait_for(Duration::from_secs(10), || async {
        metric(
            &cluster.daemon(new).metrics,
            "corvid_snapshot_installs_total",
        )
        .await
        .filter(|&n| n >= 1.0)
    })
    .await;
    assert!(installs >= Some(1.0), "node {new} was not sent a snapshot");
    // Remove a follower that is not the leader.
    let gone = (1..=3).find(|&i| i != leader).unwrap();
    cluster
        .admin(leader, AdminRequest::Remove { id: gone })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = writer.await.unwrap();
    assert_eq!(failures, 0, "writes failed during membership changes");

    let s = cluster.status(leader).await.unwrap();
    let mut expected_voters: Vec<u64> = (1..=4).filter(|&i| i != gone).collect();
    expected_voters.sort();
    assert_eq!(s.voters, expected_voters);
    // The new voter holds everything, including what was acknowledged
    // during the change.
    let mut c = cluster.client(new).await;
    let have = names(&mut c).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "too little load: {}", acked.len());
    assert!(
        acked.is_subset(&have),
        "node {new} misses acknowledged writes"
    );
    assert!(have.contains("user.pre000") && have.contains("user.pre299"));
}

/// Writes `name` through the first node in `addrs` that answers; `true`
/// when acknowledged.
async fn write_via_any(addrs: &[String], name: &str) -> bool {
    for addr in addrs {
        let Ok(mut c) = Client::connect(addr).await else {
            continue;
        };
        if c.authenticate_plain(ADMIN.0, ADMIN.1).await.is_err() {
            continue;
        }
        if let Ok(r) = c.command(&activate(name)).await {
            return r.status == Status::Ok;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_acknowledged_write() {
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let addrs: Vec<String> = (1..=3).map(|i| cluster.spec(i).mupdate.clone()).collect();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop, addrs) = (acked.clone(), stop.clone(), addrs.clone());
        tokio::spawn(async move {
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("user.roll{i:05}");
                // Start with a different node each time.
                let mut order = addrs.clone();
                order.rotate_left(i % 3);
                if write_via_any(&order, &name).await {
                    acked.lock().unwrap().insert(name);
                }
            }
        })
    };
    // Followers first, the leader last; each must catch up before the next.
    let mut order: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    order.push(leader);
    for id in order {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill(id);
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.restart(id);
        let caught_up = wait_for(Duration::from_secs(15), || async {
            let me = cluster.status(id).await?;
            let leader = cluster.status(me.leader?).await?;
            (me.applied_index + 5 >= leader.applied_index && me.applied_index > 0).then_some(())
        })
        .await;
        assert!(
            caught_up.is_some(),
            "node {id} did not catch up after its restart"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "too little load: {}", acked.len());
    for id in 1..=3 {
        let mut c = cluster.client(id).await;
        let have = names(&mut c).await;
        let missing: Vec<_> = acked.difference(&have).take(5).collect();
        assert!(
            missing.is_empty(),
            "node {id} lacks acknowledged writes {missing:?}"
        );
    }
}

/// A CA and one certificate (for 127.0.0.1) it signed, as PEM files in `dir`.
fn cluster_pki(dir: &std::path::Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
    let paths = (
        dir.join(format!("{tag}-cert.pem")),
        dir.join(format!("{tag}-key.pem")),
        dir.join(format!("{tag}-ca.pem")),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    std::fs::write(&paths.2, ca.pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_use_mutual_tls_and_refuse_strangers() {
    let pki = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cluster_pki(pki.path(), "cluster");
    let raft_toml = format!(
        "peer_tls_cert = {:?}\npeer_tls_key = {:?}\npeer_tls_ca = {:?}",
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        ca.to_str().unwrap()
    );
    let mut cluster = TestCluster::start(3, &raft_toml);
    cluster.peer_tls = Some(
        corvid_registry::tls::peer_tls(&cert, &key, &ca)
            .unwrap()
            .client,
    );
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let mut c = cluster.client(follower).await;
    c.command(&activate("user.tls"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let mut c = cluster.client(leader).await;
    assert!(c.find("user.tls").await.unwrap().is_some());

    // `corvidctl user` over mutual TLS: the certificate authenticates, no
    // administrator login is needed.
    let mut admin = PeerClient::with_tls(
        cluster.spec(follower).peer.clone(),
        cluster.peer_tls.clone(),
    );
    let add = PeerRequest::Users {
        client: corvid_registry::model::ClientTag::once(),
        login: None,
        request: corvid_registry::users::UserRequest::Add {
            name: "be-tls".into(),
            credential: corvid_registry::auth::derive_credential("tls-pw", false).unwrap(),
        },
    };
    let answer = admin.call(&add, Duration::from_secs(10)).await.unwrap();
    assert!(
        matches!(
            answer,
            corvid_registry::peer::PeerResponse::Users(
                corvid_registry::users::UserResponse::Outcome(
                    corvid_registry::model::Outcome::Done
                )
            )
        ),
        "{answer:?}"
    );
    let logged_in = wait_for(Duration::from_secs(1), || async {
        let mut c = Client::connect(&cluster.spec(leader).mupdate).await.ok()?;
        c.authenticate_plain("be-tls", "tls-pw").await.ok()
    })
    .await;
    assert!(
        logged_in.is_some(),
        "the user added over mutual TLS cannot log in"
    );

    // Without TLS, or with a certificate from another CA: no way in.
    let peer = cluster.spec(leader).peer.clone();
    let mut plain = PeerClient::new(peer.clone());
    assert!(plain
        .call(
            &PeerRequest::Admin(AdminRequest::Status),
            Duration::from_secs(5)
        )
        .await
        .is_err());
    let (c2, k2, a2) = cluster_pki(pki.path(), "stranger");
    let stranger = corvid_registry::tls::peer_tls(&c2, &k2, &a2)
        .unwrap()
        .client;
    let mut s = PeerClient::with_tls(peer, Some(stranger));
    assert!(s
        .call(
            &PeerRequest::Admin(AdminRequest::Status),
            Duration::from_secs(5)
        )
        .await
        .is_err());
}
