//! Failover measurement (a benchmark, not a CI test): kill -9 the leader of a
//! 3-node cluster under write load, over and over, and measure how long
//! writes fail. Run with `make bench-failover`; it writes
//! `docs/src/failover.md` when `CORVID_FAILOVER_REPORT` names that file.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, TestCluster, ADMIN};
use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};

/// One write through `addr` (a fresh connection, as Cyrus backends do).
async fn write(addr: &str, name: &str) -> bool {
    let attempt = async {
        let mut c = Client::connect(addr).await.ok()?;
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
        let r = c
            .command(&Command::Activate {
                name: name.into(),
                location: "be1!default".into(),
                acl: "anyone\tlrs\t".into(),
            })
            .await
            .ok()?;
        Some(r.status == Status::Ok)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with make bench-failover"]
async fn failover_window_over_many_trials() {
    let trials: usize = std::env::var("CORVID_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let mut windows = Vec::new();
    let mut seq = 0u64;
    for trial in 0..trials {
        let leader = cluster.leader(&[1, 2, 3]).await;
        let survivor = (1..=3).find(|&i| i != leader).unwrap();
        let addr = cluster.spec(survivor).mupdate.clone();
        // Load is flowing before the kill.
        seq += 1;
        assert!(
            write(&addr, &format!("user.f{seq}")).await,
            "trial {trial}: no write before the kill"
        );
        cluster.kill(leader);
        let killed = Instant::now();
        // Writes through a survivor, back to back, until one succeeds.
        loop {
            seq += 1;
            if write(&addr, &format!("user.f{seq}")).await {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "trial {trial}: writes never resumed"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let window = killed.elapsed();
        eprintln!("trial {trial:2}: leader {leader} killed, writes resumed after {window:?}");
        windows.push(window);
        cluster.restart(leader);
        // Wait until the restarted node is back in step before the next trial.
        let back = wait_for(Duration::from_secs(20), || async {
            let me = cluster.status(leader).await?;
            let l = cluster.status(me.leader?).await?;
            (me.applied_index >= l.applied_index).then_some(())
        })
        .await;
        assert!(
            back.is_some(),
            "trial {trial}: node {leader} did not catch up"
        );
    }
    windows.sort();
    let pct =
        |p: f64| windows[((windows.len() as f64 * p).ceil() as usize).clamp(1, windows.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (pct(0.5), pct(0.99), *windows.last().unwrap());
    eprintln!(
        "failover over {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        windows.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
    if let Ok(path) = std::env::var("CORVID_FAILOVER_REPORT") {
        let rows: String = windows.iter().map(|w| format!("{:.0} ", ms(*w))).collect();
        let text = format!(
            "# Failover\n\n\
             Measured by `make bench-failover`: a 3-node cluster on 127.0.0.1 (all on \
             this 2-core machine, fsync on each node), Raft heartbeat 50 ms and election \
             timeout 150–300 ms. Each trial kills the leader with SIGKILL while writes \
             go through a surviving node (a new connection, PLAIN login and ACTIVATE per \
             write, as a Cyrus backend does) and measures the time from the kill to the \
             first acknowledged write. The killed node is restarted and catches up \
             before the next trial.\n\n\
             | trials | p50 ms | p99 ms | max ms |\n| ---: | ---: | ---: | ---: |\n\
             | {} | {:.0} | {:.0} | {:.0} |\n\n\
             Every window, sorted (ms): {}\n\n\
             Where the time goes: a follower refuses to vote while its lease on the old \
             leader runs (up to 300 ms after the last heartbeat), then waits out a \
             randomized election timeout, runs a pre-vote and a vote round, and the new \
             leader commits its first entry (one fsync per node). Pre-vote keeps a node \
             that rejoins with a stale log from bumping the term with elections it \
             cannot win, and a restarted leader rejoins as a follower instead of \
             restoring its old leadership; without those two settings the window reached \
             1.1–1.7 s after a few restarts. Heartbeat 50 ms and elections of 150–300 ms \
             leave room for scheduling hiccups on a loaded 2-core machine; lower values \
             would shorten the window but risk needless elections. The target is p99 \
             under 1 second.\n",
            windows.len(),
            ms(p50),
            ms(p99),
            ms(max),
            rows.trim_end()
        );
        std::fs::write(&path, text).unwrap();
    }
    assert!(
        p99 < Duration::from_secs(1),
        "p99 failover window {p99:?} is over 1 s"
    );
}
