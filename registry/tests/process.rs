//! The real `corvid-registry` process: first start, metrics, kill -9 under
//! load, snapshots and log compaction across restarts.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{http_get, metric, names, Daemon};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};

fn admin_password(data: &Path) -> String {
    let text = std::fs::read_to_string(data.join("admin-credential.txt"))
        .expect("first start wrote the credential");
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["password"].as_str().unwrap().to_string()
}

async fn admin(addr: &str, password: &str) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.authenticate_plain("admin", password).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_admin_and_serves_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = Daemon::start(&data, &[]);
    let password = admin_password(&data);
    let mut c = admin(&d.mupdate, &password).await;
    c.command(&Command::Reserve {
        name: "user.m".into(),
        location: "be1!default".into(),
    })
    .await
    .unwrap()
    .ok()
    .unwrap();
    let metrics = http_get(&d.metrics, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for name in [
        "corvid_raft_term",
        "corvid_server_has_leader 1",
        "corvid_mupdate_commands_total{command=\"RESERVE\",result=\"ok\"} 1",
        "corvid_raft_commit_duration_seconds_bucket",
        "corvid_disk_wal_fsync_duration_seconds_bucket",
        "corvid_mupdate_connections_open 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    assert!(http_get(&d.metrics, "/other")
        .await
        .starts_with("HTTP/1.1 404"));
    // A restart keeps the credential (no new admin) and the data.
    drop(c);
    d.kill9();
    let before = std::fs::read_to_string(data.join("admin-credential.txt")).unwrap();
    let d = Daemon::start(&data, &[]);
    assert_eq!(
        before,
        std::fs::read_to_string(data.join("admin-credential.txt")).unwrap()
    );
    let mut c = admin(&d.mupdate, &password).await;
    assert!(c.find("user.m").await.unwrap().is_some());
}

/// Writers that record every acknowledged write until told to stop.
async fn write_until_stopped(
    addr: String,
    password: String,
    worker: usize,
    acked: Arc<Mutex<BTreeSet<String>>>,
    round: usize,
) {
    let Ok(mut c) = Client::connect(&addr).await else {
        return;
    };
    if c.authenticate_plain("admin", &password).await.is_err() {
        return;
    }
    for i in 0.. {
        let name = format!("user.r{round}w{worker}n{i}");
        let cmd = Command::Activate {
            name: name.clone(),
            location: "be1!default".into(),
            acl: "anyone\tlrs\t".into(),
        };
        match c.command(&cmd).await {
            Ok(r) if r.status == Status::Ok => {
                acked.lock().unwrap().insert(name);
            }
            // The server died mid-command: this write is indeterminate.
            _ => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut password = String::new();
    for round in 0..3 {
        let d = Daemon::start(&data, &[]);
        if password.is_empty() {
            password = admin_password(&data);
        }
        // Everything acknowledged in earlier rounds survived the crash.
        let mut c = admin(&d.mupdate, &password).await;
        let listed = names(&mut c).await;
        let expected = acked.lock().unwrap().clone();
        let missing: Vec<_> = expected.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "round {round}: lost acknowledged writes {missing:?}"
        );
        let writers: Vec<_> = (0..8)
            .map(|w| {
                tokio::spawn(write_until_stopped(
                    d.mupdate.clone(),
                    password.clone(),
                    w,
                    acked.clone(),
                    round,
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        d.kill9();
        for w in writers {
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .unwrap()
                .unwrap();
        }
    }
    let d = Daemon::start(&data, &[]);
    let mut c = admin(&d.mupdate, &password).await;
    let listed = names(&mut c).await;
    let expected = acked.lock().unwrap().clone();
    assert!(
        expected.len() > 100,
        "the load generated too few writes: {}",
        expected.len()
    );
    assert!(
        expected.is_subset(&listed),
        "lost acknowledged writes after the last crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("corvid.toml");
    std::fs::write(
        &config,
        "[raft]\nsnapshot_after_entries = 100\nkeep_log_entries = 10\n",
    )
    .unwrap();
    let cfg = ["--config", config.to_str().unwrap()];
    let d = Daemon::start(&data, &cfg);
    let password = admin_password(&data);
    let mut c = admin(&d.mupdate, &password).await;
    for i in 0..450 {
        common::activate(&mut c, &format!("user.s{i:04}")).await;
    }
    c.command(&Command::Delete {
        name: "user.s0000".into(),
    })
    .await
    .unwrap()
    .ok()
    .unwrap();
    let built = common::wait_for(Duration::from_secs(10), || async {
        metric(&d.metrics, "corvid_snapshot_builds_total")
            .await
            .filter(|&n| n >= 1.0)
    })
    .await;
    assert!(built.is_some(), "no snapshot was built");
    // The log behind the snapshot is compacted.
    let purged = common::wait_for(Duration::from_secs(10), || async {
        metric(&d.metrics, "corvid_raft_log_purged_index")
            .await
            .filter(|&n| n > 0.0)
    })
    .await;
    assert!(
        purged.is_some(),
        "the log was not compacted behind the snapshot"
    );
    drop(c);
    d.kill9();
    let d = Daemon::start(&data, &cfg);
    let mut c = admin(&d.mupdate, &password).await;
    let names = c.list(None).await.unwrap();
    assert_eq!(names.len(), 449);
    assert!(c.find("user.s0000").await.unwrap().is_none());
    assert!(c.find("user.s0449").await.unwrap().is_some());
}
