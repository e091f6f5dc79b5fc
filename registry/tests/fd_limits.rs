//! The real `corvid-registry` process against descriptor exhaustion, login
//! floods and bad start-up configurations (issue 9, sections 1 and 6).
//!
//! Descriptor limits are set on the child only (in `pre_exec`, or with
//! `prlimit` on a running child), never on the test process.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::{
    activate, metric, ready_lines, registry_bin, wait_for, write_users, Daemon, TestCluster, ADMIN,
};
use corvid_registry::mupdate::client::Client;
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(30);

/// Starts `corvid-registry` with `args` and, if set, an open-file limit.
/// `Ok` once it printed its ready line; `Err(stderr)` if it exited first.
fn spawn(args: &[&str], nofile: Option<u64>) -> Result<Daemon, String> {
    let mut cmd = Process::new(registry_bin());
    cmd.args(args)
        .env(
            "CORVID_LOG",
            std::env::var("CORVID_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(n) = nofile {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn corvid-registry");
    let rx = ready_lines(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let (etx, erx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Echo the log (for failures) and keep it for the caller.
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        eprint!("{all}");
        let _ = etx.send(all);
    });
    let started = Instant::now();
    loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
            return Ok(Daemon::from_ready_line(&line, child));
        }
        if child.try_wait().unwrap().is_some() {
            return Err(erx.recv_timeout(DEADLINE).unwrap_or_default());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "corvid-registry did not start"
        );
    }
}

fn node_args(dir: &Path) -> Vec<String> {
    let users = dir.join("users.toml");
    if !users.exists() {
        write_users(&users);
    }
    [
        "--data-dir",
        dir.join("data").to_str().unwrap(),
        "--users-file",
        users.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn admin(addr: &str) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.authenticate_plain(ADMIN.0, ADMIN.1).await.unwrap();
    c
}

/// Opens up to `n` connections to `addr`. The kernel completes them whether
/// or not the node accepts them, until the listen backlog is full; the
/// flood stops at the first connection that does not complete.
async fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => conns.push(s),
            _ => break,
        }
    }
    conns
}

/// One metric's value, or `None` if the endpoint did not answer in time (or
/// closed the connection at its cap).
async fn scrape(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    })
    .await
    .ok()??;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn set_nofile(pid: u32, n: u64) {
    let rl = libc::rlimit {
        rlim_cur: n,
        rlim_max: n.max(20_000),
    };
    // SAFETY: prlimit reads `rl` and writes nothing (old limit not asked).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &rl,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_under_ulimit_256_serves_through_400_connections() {
    let dir = tempfile::tempdir().unwrap();
    let args = node_args(dir.path());
    let mut d = spawn(&refs(&args), Some(256)).expect("starts under ulimit -n 256");
    // 256 - 64 reserved - 128 peer connections: 64 MUPDATE connections.
    // The listener task sets the gauge as it starts, which may come just
    // after the ready line: wait for it.
    let cap = wait_for(DEADLINE, || {
        metric(&d.metrics, "corvid_mupdate_connections_max")
    })
    .await;
    assert_eq!(cap, Some(64.0));
    let mut session = admin(&d.mupdate).await;
    activate(&mut session, "user.before").await;
    let conns = flood(&d.mupdate, 400).await;
    assert_eq!(conns.len(), 400);
    assert!(d.child.try_wait().unwrap().is_none(), "the node exited");
    for i in 0..20 {
        activate(&mut session, &format!("user.during{i}")).await;
        assert!(session.find("user.before").await.unwrap().is_some());
    }
    assert!(d.child.try_wait().unwrap().is_none(), "the node exited");
    drop(conns);
    // Once the flood is gone, new clients get in again.
    let back = wait_for(DEADLINE, || async {
        let mut c = Client::connect(&d.mupdate).await.ok()?;
        c.authenticate_plain(ADMIN.0, ADMIN.1).await.ok()?;
        Some(c)
    })
    .await;
    assert!(back.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_on_a_leader_stops_neither_it_nor_raft() {
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let mut session = cluster.client(leader).await;
    activate(&mut session, "user.before").await;
    let term = cluster.status(leader).await.unwrap().term;
    let pid = cluster.daemon(leader).child.id();
    let spec_mupdate = cluster.spec(leader).mupdate.clone();
    let spec_peer = cluster.spec(leader).peer.clone();
    let metrics_addr = cluster.daemon(leader).metrics.clone();

    // Leave the leader 8 spare descriptors, then flood all three ports.
    let t0 = Instant::now();
    set_nofile(pid, open_fds(pid) + 8);
    // (100 is within the listen backlog, and far beyond 8 descriptors.)
    let mut held = flood(&spec_mupdate, 100).await;
    assert_eq!(held.len(), 100);
    held.extend(flood(&spec_peer, 20).await);
    held.extend(flood(&metrics_addr, 20).await);
    // For well over an election timeout, writes through the leader commit
    // and it stays the leader of the same term.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..20 {
        tick.tick().await;
        activate(&mut session, &format!("user.during{i}")).await;
    }
    for &f in &followers {
        let s = cluster.status(f).await.expect("follower answers");
        assert_eq!((s.leader, s.term), (Some(leader), term), "node {f}");
    }
    eprintln!("flood and 20 writes: {:?}", t0.elapsed());
    drop(held);
    set_nofile(pid, 20_000);

    // Every listener failed to accept, and every one is back.
    for listener in ["mupdate", "peer", "metrics"] {
        let name = format!("corvid_accept_errors_total{{listener=\"{listener}\"}}");
        let n = wait_for(DEADLINE, || scrape(&metrics_addr, &name)).await;
        assert!(n.is_some_and(|n| n > 0.0), "{name}: {n:?}");
    }
    eprintln!("accept errors counted: {:?}", t0.elapsed());
    let s = wait_for(DEADLINE, || cluster.status(leader)).await.unwrap();
    assert_eq!((s.role.as_str(), s.term), ("Leader", term));
    let mut c = cluster.client(leader).await;
    assert!(c.find("user.during19").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_password_logins_do_not_move_the_leader() {
    let cluster = TestCluster::start(3, "");
    cluster.init(3).await;
    // A user whose record asks for 100,000 PBKDF2 iterations (OWASP
    // suggests more): each wrong password costs tens of milliseconds of CPU.
    let mut users = std::fs::read_to_string(cluster.users_file()).unwrap();
    let key = "A".repeat(43) + "=";
    users.push_str(&format!(
        "\n[[user]]\nname = \"hardened\"\nsalt = \"c2FsdHNhbHRzYWx0c2FsdA==\"\n\
         iterations = 100000\nstored_key = \"{key}\"\nserver_key = \"{key}\"\n"
    ));
    std::fs::write(cluster.users_file(), users).unwrap();
    let leader = cluster.leader(&[1, 2, 3]).await;
    let before: Vec<_> = futures::future::join_all((1..=3).map(|i| cluster.status(i))).await;
    let addr = cluster.spec(leader).mupdate.clone();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(&addr).await.unwrap();
                // Known users, wrong password; or an unknown one (the decoy).
                let user = match i % 3 {
                    0 => "hardened".to_string(),
                    1 => ADMIN.0.to_string(),
                    _ => format!("stranger{i}"),
                };
                c.authenticate_plain(&user, "wrong-password").await.is_err()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap(), "a wrong password was accepted");
    }
    let took = started.elapsed();
    eprintln!("200 parallel wrong-password logins on the leader took {took:?}");
    let after: Vec<_> = futures::future::join_all((1..=3).map(|i| cluster.status(i))).await;
    for (b, a) in before.iter().zip(&after) {
        let (b, a) = (b.as_ref().unwrap(), a.as_ref().unwrap());
        assert_eq!(
            (a.term, a.leader),
            (b.term, b.leader),
            "node {}: an election happened during the logins",
            a.id
        );
    }
    let mut c = cluster.client(leader).await;
    activate(&mut c, "user.after").await;
}

/// Starts with `extra` (a config file's text and flags) and expects a
/// refusal; returns the error output.
fn refused(toml: &str, flags: &[&str], nofile: Option<u64>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml).unwrap();
    let mut args = node_args(dir.path());
    if flags.contains(&"--peer-listen") {
        let at = args.iter().position(|a| a == "--peer-listen").unwrap();
        args.drain(at..at + 2);
    }
    args.extend(["--config".into(), config.to_str().unwrap().into()]);
    args.extend(flags.iter().map(|s| s.to_string()));
    match spawn(&refs(&args), nofile) {
        Ok(d) => panic!(
            "started, but should have refused: {toml} {flags:?} (mupdate {})",
            d.mupdate
        ),
        Err(stderr) => stderr,
    }
}

#[test]
fn too_few_descriptors_refuse_to_start() {
    let err = refused("", &[], Some(150));
    assert!(
        err.contains("RLIMIT_NOFILE") && err.contains("150"),
        "{err}"
    );
}

#[test]
fn half_configured_tls_refuses_to_start() {
    let err = refused("[tls]\ncert = \"/nonexistent/cert.pem\"\n", &[], None);
    assert!(
        err.contains("[tls] needs both cert and key (only cert"),
        "{err}"
    );
    let err = refused("[tls]\nkey = \"/nonexistent/key.pem\"\n", &[], None);
    assert!(err.contains("only key"), "{err}");
    let err = refused(
        "[raft]\npeer_tls_key = \"/nonexistent/key.pem\"\n",
        &[],
        None,
    );
    assert!(err.contains("go together (1 of 3 set)"), "{err}");
    let err = refused(
        "[raft]\npeer_tls_cert = \"/nonexistent/c.pem\"\npeer_tls_ca = \"/nonexistent/ca.pem\"\n",
        &[],
        None,
    );
    assert!(err.contains("go together (2 of 3 set)"), "{err}");
}

#[test]
fn open_peer_port_without_tls_refuses_to_start() {
    // Refused while checking the configuration, before anything is bound.
    let err = refused("", &["--peer-listen", "192.0.2.1:0"], None);
    assert!(
        err.contains("not a loopback address") && err.contains("allow_insecure_peer"),
        "{err}"
    );
}
