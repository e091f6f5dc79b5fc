//! Replicated users (issue 13, part 1), with real `corvid-registry`
//! processes on 127.0.0.1: a user added, re-keyed or deleted through any
//! master node's peer port (what `corvidctl user` sends) takes effect for
//! MUPDATE AUTHENTICATE on every master and on a replica within a second,
//! and the Raft snapshot and the replica stream's snapshot carry users.
//!
//! Every node here also reads the same users file (ADMIN and READER): the
//! registry must win over it, deletions included.

mod common;

use std::time::{Duration, Instant};

use common::{
    activate, free_port, metric, metric_reaches, wait_for, Daemon, TestCluster, ADMIN, READER,
};
use corvid_registry::auth::derive_credential;
use corvid_registry::model::{ClientTag, Outcome, Refusal};
use corvid_registry::mupdate::client::Client;
use corvid_registry::peer::{AdminRequest, PeerClient, PeerRequest, PeerResponse};
use corvid_registry::users::{AdminLogin, UserRequest, UserResponse};

/// How soon a change must be usable everywhere.
const PROPAGATION: Duration = Duration::from_secs(1);

fn admin_login() -> Option<AdminLogin> {
    Some(AdminLogin {
        user: ADMIN.0.into(),
        password: ADMIN.1.into(),
    })
}

/// Sends a user request to the peer port at `peer`, as `corvidctl user` does.
async fn users(
    peer: &str,
    login: Option<AdminLogin>,
    request: UserRequest,
) -> Result<UserResponse, String> {
    let mut c = PeerClient::new(peer);
    let request = PeerRequest::Users {
        client: ClientTag::once(),
        login,
        request,
    };
    match c.call(&request, Duration::from_secs(30)).await {
        Ok(PeerResponse::Users(r)) => Ok(r),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn write(peer: &str, request: UserRequest) -> Outcome {
    match users(peer, admin_login(), request).await {
        Ok(UserResponse::Outcome(o)) => o,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Whether `user` can AUTHENTICATE with `password` on the MUPDATE server at
/// `addr` (PLAIN, or SCRAM-SHA-256 with `scram`).
async fn can_login(addr: &str, user: &str, password: &str, scram: bool) -> bool {
    let Ok(mut c) = Client::connect(addr).await else {
        return false;
    };
    let res = if scram {
        c.authenticate_scram_sha256(user, password).await
    } else {
        c.authenticate_plain(user, password).await
    };
    res.is_ok()
}

/// Waits until every server in `addrs` answers `user`/`password` with
/// `expected` (PLAIN and SCRAM alike); returns the time it took, or panics
/// after [`PROPAGATION`].
async fn everywhere(addrs: &[String], user: &str, password: &str, expected: bool) -> Duration {
    let started = Instant::now();
    for addr in addrs {
        let seen = wait_for(PROPAGATION, || async {
            let plain = can_login(addr, user, password, false).await;
            let scram = can_login(addr, user, password, true).await;
            (plain == expected && scram == expected).then_some(())
        })
        .await;
        assert!(
            seen.is_some(),
            "{user} with {password:?} on {addr}: still not {} after {:?}",
            if expected { "accepted" } else { "refused" },
            started.elapsed()
        );
    }
    let took = started.elapsed();
    assert!(took <= PROPAGATION, "took {took:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_added_changed_and_deleted_on_one_node_take_effect_everywhere() {
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let replica_addr = format!("127.0.0.1:{}", free_port());
    let masters: Vec<u64> = vec![1, 2, 3];
    let _replica = cluster.replica("replica", &masters, &replica_addr);
    let mut addrs: Vec<String> = (1..=3).map(|i| cluster.spec(i).mupdate.clone()).collect();
    addrs.push(replica_addr.clone());
    // The replica has synced (it answers READER from the file meanwhile).
    let mut c = cluster.client(leader).await;
    activate(&mut c, "user.synced").await;
    let synced = wait_for(Duration::from_secs(20), || async {
        let mut r = Client::connect(&replica_addr).await.ok()?;
        r.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
        r.find("user.synced").await.ok()?
    })
    .await;
    assert!(synced.is_some(), "the replica did not sync");
    let follower_peer = cluster.spec(follower).peer.clone();

    // Unauthenticated, wrong-password and non-admin requests are refused
    // and change nothing.
    let add = |name: &str, password: &str, admin| UserRequest::Add {
        name: name.into(),
        credential: derive_credential(password, admin).unwrap(),
    };
    for login in [
        None,
        Some(AdminLogin {
            user: ADMIN.0.into(),
            password: "wrong".into(),
        }),
        Some(AdminLogin {
            user: READER.0.into(),
            password: READER.1.into(),
        }),
    ] {
        let r = users(&follower_peer, login.clone(), add("mallory", "pw", true)).await;
        assert!(
            matches!(&r, Err(e) if e.contains("administrator's login")),
            "{login:?}: {r:?}"
        );
    }
    assert_eq!(
        metric(
            &cluster.daemon(follower).metrics,
            "corvid_user_admin_refused_total"
        )
        .await,
        Some(3.0)
    );

    // Added through a follower (forwarded to the leader).
    assert_eq!(
        write(&follower_peer, add("be9", "first-pw", false)).await,
        Outcome::Done
    );
    let took = everywhere(&addrs, "be9", "first-pw", true).await;
    eprintln!("a new user could log in on 3 masters and a replica after {took:?}");
    assert_eq!(
        write(&follower_peer, add("be9", "other", true)).await,
        Outcome::Refused(Refusal::UserExists)
    );
    assert!(!can_login(&addrs[0], "mallory", "pw", false).await);

    // A password change, through another node.
    let other_peer = cluster.spec(leader).peer.clone();
    assert_eq!(
        write(
            &other_peer,
            UserRequest::Passwd {
                name: "be9".into(),
                credential: derive_credential("second-pw", true).unwrap(),
            }
        )
        .await,
        Outcome::Done
    );
    everywhere(&addrs, "be9", "first-pw", false).await;
    everywhere(&addrs, "be9", "second-pw", true).await;

    // The list shows users and admin flags (the password change kept
    // be9 a non-admin).
    match users(&follower_peer, admin_login(), UserRequest::List).await {
        Ok(UserResponse::List(list)) => assert_eq!(list, vec![("be9".to_string(), false)]),
        other => panic!("{other:?}"),
    }

    // Deleted: refused everywhere. READER is in every node's users file,
    // yet a deletion through the registry wins over it.
    for name in ["be9", READER.0] {
        let outcome = write(&follower_peer, UserRequest::Del { name: name.into() }).await;
        assert_eq!(outcome, Outcome::Done, "{name}");
    }
    everywhere(&addrs, "be9", "second-pw", false).await;
    everywhere(&addrs, READER.0, READER.1, false).await;
    assert_eq!(
        write(&follower_peer, UserRequest::Del { name: "be9".into() }).await,
        Outcome::Refused(Refusal::NoSuchUser)
    );
    // ADMIN, known from the file only, still logs in.
    everywhere(&addrs, ADMIN.0, ADMIN.1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_the_replica_stream_carry_users() {
    let mut cluster = TestCluster::start(1, "snapshot_after_entries = 20\nkeep_log_entries = 2");
    cluster.init(1).await;
    cluster.leader(&[1]).await;
    let peer = cluster.spec(1).peer.clone();
    let add = UserRequest::Add {
        name: "carol".into(),
        credential: derive_credential("carol-pw", false).unwrap(),
    };
    assert_eq!(write(&peer, add).await, Outcome::Done);
    assert_eq!(
        write(
            &peer,
            UserRequest::Del {
                name: READER.0.into()
            }
        )
        .await,
        Outcome::Done
    );
    // Enough entries after the user writes for a snapshot and a purge.
    let mut c = cluster.client(1).await;
    for i in 0..60 {
        activate(&mut c, &format!("user.fill{i:02}")).await;
    }
    let master = cluster.daemon(1).metrics.clone();
    let ten = Duration::from_secs(10);
    assert!(
        metric_reaches(&master, "corvid_snapshot_builds_total", 1.0, ten).await,
        "no snapshot was built"
    );

    // A node joining now gets the state by snapshot, users included.
    let new = cluster.add_learner(1).await;
    assert!(
        metric_reaches(
            &cluster.daemon(new).metrics,
            "corvid_snapshot_installs_total",
            1.0,
            ten
        )
        .await,
        "node {new} was not sent a snapshot"
    );

    // A replica that starts now is past the purged log: its stream sends
    // the state as a snapshot, users included.
    let replica_addr = format!("127.0.0.1:{}", free_port());
    let _replica = cluster.replica("replica", &[1], &replica_addr);
    assert!(
        metric_reaches(&master, "corvid_stream_snapshots_sent_total", 1.0, ten).await,
        "the replica was not sent a snapshot"
    );

    let addrs = [cluster.spec(new).mupdate.clone(), replica_addr];
    let took = wait_for(Duration::from_secs(20), || async {
        let mut ok = true;
        for a in &addrs {
            ok &= can_login(a, "carol", "carol-pw", false).await;
        }
        ok.then_some(())
    })
    .await;
    assert!(took.is_some(), "carol cannot log in after the snapshots");
    everywhere(&addrs, "carol", "carol-pw", true).await;
    // The deletion travelled too: the users file cannot bring READER back.
    everywhere(&addrs, READER.0, READER.1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_init_creates_the_administrator_once_on_the_init_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<(String, String, std::path::PathBuf)> = (1..=3)
        .map(|i| {
            (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
                dir.path().join(format!("node{i}")),
            )
        })
        .collect();
    // No users file anywhere: nodes joining a cluster create no user.
    let _daemons: Vec<Daemon> = nodes
        .iter()
        .enumerate()
        .map(|(i, (mupdate, peer, data))| {
            let id = (i + 1).to_string();
            Daemon::start(
                data,
                &[
                    "--node-id",
                    &id,
                    "--no-bootstrap",
                    "--listen",
                    mupdate,
                    "--peer-listen",
                    peer,
                ],
            )
        })
        .collect();
    for (_, _, data) in &nodes {
        assert!(!data.join("admin-credential.txt").exists());
    }
    let members = nodes
        .iter()
        .enumerate()
        .map(|(i, (_, peer, _))| (i as u64 + 1, peer.clone()))
        .collect();
    let mut c = PeerClient::new(nodes[0].1.clone());
    let init = c
        .call(
            &PeerRequest::Admin(AdminRequest::Init { members }),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(matches!(init, PeerResponse::Admin(_)), "{init:?}");

    // What `corvidctl cluster init` sends next; no login is needed for it.
    let path = match users(&nodes[0].1, None, UserRequest::CreateFirstAdmin).await {
        Ok(UserResponse::FirstAdmin(Some(path))) => path,
        other => panic!("{other:?}"),
    };
    assert_eq!(path, nodes[0].2.join("admin-credential.txt"));
    let text = std::fs::read_to_string(&path).unwrap();
    let file: toml::Value = toml::from_str(&text).unwrap();
    let password = file["password"].as_str().unwrap().to_string();
    assert_eq!(file["user"].as_str(), Some("admin"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let addrs: Vec<String> = nodes.iter().map(|(m, _, _)| m.clone()).collect();
    everywhere(&addrs, "admin", &password, true).await;

    // Once only: asked again, on any node, nothing is created.
    for (_, peer, data) in &nodes[1..] {
        match users(peer, None, UserRequest::CreateFirstAdmin).await {
            Ok(UserResponse::FirstAdmin(None)) => {}
            other => panic!("{other:?}"),
        }
        assert!(!data.join("admin-credential.txt").exists());
    }
    everywhere(&addrs, "admin", &password, true).await;
    // The administrator manages users with that password.
    let login = Some(AdminLogin {
        user: "admin".into(),
        password,
    });
    match users(&nodes[2].1, login, UserRequest::List).await {
        Ok(UserResponse::List(list)) => assert_eq!(list, vec![("admin".to_string(), true)]),
        other => panic!("{other:?}"),
    }
}
