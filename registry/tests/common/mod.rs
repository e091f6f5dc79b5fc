//! Shared set-up for integration tests: nodes with their own temporary data
//! directory, listening on ports chosen by the OS on 127.0.0.1.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use corvid_registry::auth::UserFile;
use corvid_registry::config::Config;
use corvid_registry::daemon::{self, Running};
use corvid_registry::mupdate::client::Client;

/// Administrator created in every test node.
pub const ADMIN: (&str, &str) = ("admin", "admin-secret");
/// A non-admin user.
pub const READER: (&str, &str) = ("reader", "reader-secret");

/// An in-process node and its temporary directory.
pub struct TestNode {
    pub running: Running,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub fn addr(&self) -> String {
        self.running.mupdate_addr.to_string()
    }

    pub async fn admin(&self) -> Client {
        let mut c = Client::connect(&self.addr()).await.expect("connect");
        c.authenticate_plain(ADMIN.0, ADMIN.1)
            .await
            .expect("admin login");
        c
    }
}

/// Writes a users file with ADMIN and READER.
pub fn write_users(path: &Path) {
    let mut users = UserFile::load(path).unwrap();
    users.add(ADMIN.0, ADMIN.1, true).unwrap();
    users.add(READER.0, READER.1, false).unwrap();
    users.save(path).unwrap();
}

/// A test configuration for a node in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.node.data_dir = dir.join("data");
    c.node.server_name = "corvid-test".into();
    c.mupdate.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c.mupdate.failed_auth_delay_ms = 10;
    c.auth.users_file = Some(dir.join("users.toml"));
    c
}

/// Starts a node with `tweak` applied to the test configuration.
pub async fn start_node(tweak: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    write_users(&config.users_file());
    tweak(&mut config);
    let running = daemon::start(&config).await.expect("node starts");
    TestNode { running, dir }
}

/// Path of the `corvid-registry` binary built with the tests.
pub fn registry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_corvid-registry"))
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
