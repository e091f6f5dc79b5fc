//! LMTP (RFC 2033): the MTA delivers here; each recipient is looked up in
//! the replica at RCPT time, the message is spooled once and handed to
//! every backend concerned in one LMTP transaction per backend, in
//! parallel. No lookup reaches a master, so delivery goes on while the
//! registry has no leader.
//!
//! * [`codec`]: commands, addresses, recipient forms, the DATA terminator
//!   (pure).
//! * [`spool`]: the message, in memory or in an unnamed file.
//! * [`deliver`]: one transaction with one backend.

pub mod codec;
pub mod deliver;
mod session;
pub mod spool;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::backend::BackendSettings;
use crate::listen::{self, Listener};
use crate::namespace::Namespace;
use crate::routing::Router;

/// Everything LMTP sessions share.
pub struct Shared {
    /// Recipient → backend.
    pub router: Router,
    /// Naming (INBOX names, virtual domains).
    pub namespace: Namespace,
    /// The proxy's own login on backends.
    pub backend: BackendSettings,
    /// Name in the greeting and LHLO answer.
    pub hostname: String,
    /// Largest message.
    pub max_message_bytes: u64,
    /// Spooled in memory up to this size.
    pub spool_memory_bytes: usize,
    /// Where bigger messages are spooled.
    pub spool_dir: Option<PathBuf>,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// MTA silence, and one backend transaction, at most this long.
    pub timeout: Duration,
    /// Cyrus's `postuser`: the local part that addresses shared folders.
    pub postuser: String,
    /// Session ids, for logs.
    pub next_id: AtomicU64,
    /// Idle logged-in connections to the backends' lmtpd.
    pub pool: deliver::Pool,
}

/// Answers a connection over the session cap and closes it.
async fn refuse<S: tokio::io::AsyncWrite + Unpin>(mut s: S) {
    metrics::counter!("corvid_proxy_sessions_refused_total", "protocol" => "lmtp").increment(1);
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(REFUSAL)).await;
}

/// What an MTA over the session cap is told.
const REFUSAL: &[u8] = b"421 4.3.2 Too many sessions; try again later\r\n";

/// Accepts LMTP over TCP forever.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, slots: Arc<Semaphore>) {
    let how = Listener {
        name: "lmtp",
        protocol: "lmtp",
        slots,
        tls: None,
        refusal: REFUSAL,
    };
    listen::serve(listener, how, move |stream, peer| {
        session::run(shared.clone(), stream, peer.to_string())
    })
    .await
}

/// Accepts LMTP on a UNIX socket forever (Postfix's `lmtp:unix:`).
pub async fn serve_unix(listener: UnixListener, shared: Arc<Shared>, slots: Arc<Semaphore>) {
    loop {
        let conn = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                metrics::counter!("corvid_accept_errors_total", "listener" => "lmtp-unix")
                    .increment(1);
                tracing::warn!(error = %e, "accept on the LMTP socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(conn));
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            session::run(shared, conn, "unix".into()).await;
            drop(permit);
        });
    }
}
