//! Starting the real `corvid-proxy` binary for the edge tests: a private
//! directory, a self-signed certificate, a replica that follows a master
//! that is not there (so no backend and no registry are needed), and the
//! addresses from its ready line.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

/// The binary under test (`CORVID_BIN_DIR` overrides the cargo-built one).
pub fn proxy_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("CORVID_BIN_DIR") {
        return Path::new(&dir).join("corvid-proxy");
    }
    PathBuf::from(env!("CARGO_BIN_EXE_corvid-proxy"))
}

/// A running proxy, killed when dropped.
pub struct Proxy {
    child: Child,
    ready: String,
    /// The self-signed certificate it serves (PEM).
    pub cert: Vec<u8>,
    /// Its private directory (config, replica, sockets).
    pub dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// The address its ready line gives for `key` (`imap`, `pop3s`, …).
    pub fn addr(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready))
            .to_string()
    }
}

/// Starts corvid-proxy with `sections` (TOML; `{dir}` stands for its
/// directory) added to a base of: replica data in the directory, a TLS
/// certificate, an unused backend password, and — unless `sections` has
/// its own — metrics off, a replica following nothing and IMAP off.
pub fn start(sections: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let mut config = format!(
        "[proxy]\ndata_dir = \"{d}/replica\"\n\
         [tls]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n\
         [backend]\npassword = \"unused\"\n"
    );
    if !sections.contains("[metrics]") {
        config.push_str("[metrics]\nlisten = \"\"\n");
    }
    if !sections.contains("[replica]") {
        // Port 9 (discard): nothing listens, so the replica never syncs.
        config.push_str("[replica]\nmasters = [\"127.0.0.1:9\"]\n");
    }
    if !sections.contains("[imap]") {
        config.push_str("[imap]\nlisten = \"\"\n");
    }
    config.push_str(&sections.replace("{dir}", &d));
    std::fs::write(dir.path().join("proxy.toml"), config).unwrap();
    let mut child = Command::new(proxy_bin())
        .arg("--config")
        .arg(dir.path().join("proxy.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("corvid-proxy starts");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(
        ready.starts_with("corvid-proxy ready"),
        "ready line: {ready:?}"
    );
    Proxy {
        child,
        ready,
        cert: cert_pem.into_bytes(),
        dir,
    }
}

/// A TLS client that trusts `cert_pem` (the proxy's self-signed one).
pub fn tls_connector(cert_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
