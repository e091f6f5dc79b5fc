//! `/healthz` and `/readyz` on the real corvid-proxy's metrics port: the
//! proxy is ready when its embedded replica is (synchronised with a real
//! registry node, not too far behind), and stays ready with its copy when
//! the masters go away, as lookups are meant to go on then.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// The metrics port on, and LMTP as the one listener a proxy needs.
const METRICS_AND_LMTP: &str =
    "[metrics]\nlisten = \"127.0.0.1:0\"\n[lmtp]\nlisten = \"127.0.0.1:0\"\n";

/// The status code and the body of `GET path` on `addr`.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, body)
}

/// Waits up to `limit` for `/readyz` to answer `code` with `text` in it.
async fn wait_readyz(addr: &str, code: u16, text: &str, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = get(addr, "/readyz").await;
        if last.0 == code && last.1.contains(text) {
            return last.1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {code} {text:?} in {limit:?}; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn not_ready_before_its_replica_has_synchronised() {
    // The default base: a replica following a master that is not there.
    let proxy = common::start(METRICS_AND_LMTP);
    let metrics = proxy.addr("metrics");
    assert_eq!(get(&metrics, "/healthz").await, (200, "ok\n".to_string()));
    let body = wait_readyz(&metrics, 503, "first sync", Duration::from_secs(5)).await;
    assert!(
        body.starts_with("not ready: ") && body.lines().count() == 1,
        "{body:?}"
    );
    // Other paths and methods are refused, /metrics still served.
    assert_eq!(get(&metrics, "/ready").await.0, 404);
    let (code, text) = get(&metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains("corvid_replica_connected"), "{text}");
}

/// A real one-node registry (RocksDB, Raft, peer port) on its own Tokio
/// runtime in a thread, so that stopping it closes every socket it has.
struct Node {
    peer: std::net::SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut config = corvid_registry::config::Config::default();
        config.node.data_dir = dir.path().join("node");
        config.mupdate.listen = "127.0.0.1:0".parse().unwrap();
        config.raft.peer_listen = "127.0.0.1:0".parse().unwrap();
        config.auth.users_file = Some(dir.path().join("users.toml"));
        let (peer_tx, peer_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let node = rt
                .block_on(corvid_registry::daemon::start(&config))
                .unwrap();
            peer_tx.send(node.peer_addr.unwrap()).unwrap();
            let _ = stop_rx.recv();
            rt.block_on(node.directory.shutdown());
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let peer = peer_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the registry node starts");
        Node {
            peer,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Stops the node and waits until its runtime is gone.
    fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_following_a_real_registry_node_and_after_it_stops() {
    let mut node = Node::start();
    let proxy = common::start(&format!(
        "{METRICS_AND_LMTP}[replica]\nmasters = [\"{}\"]\nready_max_lag_entries = 0\n",
        node.peer
    ));
    let metrics = proxy.addr("metrics");
    let body = wait_readyz(&metrics, 200, "following a master", Duration::from_secs(20)).await;
    assert!(
        body.starts_with("ready: ") && body.contains("0 entries behind"),
        "{body}"
    );

    // The masters gone: the copy is still served, and the proxy says so.
    tokio::task::block_in_place(|| node.stop());
    wait_readyz(
        &metrics,
        200,
        "no master reachable",
        Duration::from_secs(20),
    )
    .await;
}
