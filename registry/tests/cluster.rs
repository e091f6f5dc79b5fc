//! Multi-node registries: real `corvid-registry` processes on 127.0.0.1,
//! each with its own RocksDB, talking Raft over TCP.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metric, wait_for, write_users, Daemon, ADMIN};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};
use corvid_registry::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerRequest, PeerResponse,
};

/// A port that is free now (the OS picks it; the node keeps it across restarts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node's fixed identity: id, ports and data directory.
struct NodeSpec {
    id: u64,
    mupdate: String,
    peer: String,
    data: PathBuf,
}

struct TestCluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    users: PathBuf,
    specs: Vec<NodeSpec>,
    nodes: Vec<Option<Daemon>>,
}

impl TestCluster {
    /// Starts `n` nodes (not yet a cluster) with `raft_toml` appended to
    /// their `[raft]` section.
    fn start(n: u64, raft_toml: &str) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("corvid.toml");
        std::fs::write(
            &config,
            format!("[mupdate]\nfailed_auth_delay_ms = 10\n[raft]\nwrite_timeout_ms = 3000\n{raft_toml}\n"),
        )
        .unwrap();
        let users = dir.path().join("users.toml");
        write_users(&users);
        let mut c = TestCluster {
            config,
            users,
            specs: Vec::new(),
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..n {
            c.add_node();
        }
        c
    }

    /// Starts one more node, outside the cluster until it is added.
    fn add_node(&mut self) -> u64 {
        let id = self.specs.len() as u64 + 1;
        self.specs.push(NodeSpec {
            id,
            mupdate: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            data: self.dir.path().join(format!("node{id}")),
        });
        self.nodes.push(None);
        self.restart(id);
        id
    }

    fn spec(&self, id: u64) -> &NodeSpec {
        &self.specs[(id - 1) as usize]
    }

    fn restart(&mut self, id: u64) {
        let s = self.spec(id);
        let id_s = s.id.to_string();
        let d = Daemon::start(
            &s.data,
            &[
                "--config",
                self.config.to_str().unwrap(),
                "--users-file",
                self.users.to_str().unwrap(),
                "--node-id",
                &id_s,
                "--no-bootstrap",
                "--listen",
                &s.mupdate,
                "--peer-listen",
                &s.peer,
            ],
        );
        self.nodes[(id - 1) as usize] = Some(d);
    }

    fn kill(&mut self, id: u64) {
        if let Some(d) = self.nodes[(id - 1) as usize].take() {
            d.kill9();
        }
    }

    fn daemon(&self, id: u64) -> &Daemon {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    async fn admin(&self, id: u64, request: AdminRequest) -> Result<AdminResponse, String> {
        let mut c = PeerClient::new(self.spec(id).peer.clone());
        match c
            .call(&PeerRequest::Admin(request), Duration::from_secs(60))
            .await
        {
            Ok(PeerResponse::Admin(r)) => Ok(r),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn status(&self, id: u64) -> Option<NodeStatus> {
        match self.admin(id, AdminRequest::Status).await {
            Ok(AdminResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// Initializes nodes `1..=n` as the voters.
    async fn init(&self, n: u64) {
        let members = (1..=n).map(|id| (id, self.spec(id).peer.clone())).collect();
        self.admin(1, AdminRequest::Init { members }).await.unwrap();
    }

    /// The leader as seen by `from`, once one is elected.
    async fn leader(&self, from: &[u64]) -> u64 {
        wait_for(Duration::from_secs(15), || async {
            for &id in from {
                if let Some(s) = self.status(id).await {
                    if let Some(l) = s.leader {
                        if from.contains(&l)
                            && self.status(l).await.is_some_and(|ls| ls.role == "Leader")
                        {
                            return Some(l);
                        }
                    }
                }
            }
            None
        })
        .await
        .expect("a leader is elected")
    }

    async fn client(&self, id: u64) -> Client {
        let mut c = Client::connect(&self.spec(id).mupdate).await.unwrap();
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
        c
    }
}

fn activate(name: &str) -> Command {
    Command::Activate {
        name: name.into(),
        location: "be1!default".into(),
        acl: "anyone\tlrs\t".into(),
    }
}

async fn names(c: &mut Client) -> BTreeSet<String> {
    c.list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
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
    assert!(
        r.text.contains("linearizable"),
        "the refusal says why: {r:?}"
    );

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
    let new = cluster.add_node();
    cluster
        .admin(
            1,
            AdminRequest::AddLearner {
                id: new,
                addr: cluster.spec(new).peer.clone(),
            },
        )
        .await
        .unwrap();
    cluster
        .admin(2, AdminRequest::Promote { id: new })
        .await
        .unwrap();
    let installs = wait_for(Duration::from_secs(10), || async {
        metric(
            &cluster.daemon(new).metrics,
            "corvid_snapshot_installs_total",
        )
        .await
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
