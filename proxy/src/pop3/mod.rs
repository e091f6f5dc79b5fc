//! POP3 (RFC 1939, STLS from RFC 2595, AUTH PLAIN from RFC 5034): the
//! client logs in here, the proxy looks up the INBOX in the replica, logs in
//! to that backend's pop3d with proxy authentication, relays its `+OK`, then
//! copies bytes both ways.

use std::sync::Arc;
use std::time::Duration;

use corvid_registry::net::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backend::BackendSettings;
use crate::login::PasswordCheck;
use crate::namespace::Namespace;
use crate::routing::Router;

/// Everything POP3 sessions share.
pub struct Shared {
    /// Mailbox → backend (the INBOX's server; its POP3 address).
    pub router: Router,
    /// Naming (the INBOX's internal name).
    pub namespace: Namespace,
    /// How passwords are checked (the same as IMAP's).
    pub password_check: PasswordCheck,
    /// The proxy's own login on backends.
    pub backend: BackendSettings,
    /// For STLS and implicit TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Before login.
    pub login_timeout: Duration,
    /// After login, client silence.
    pub idle_timeout: Duration,
    /// Pause before answering a failed login.
    pub failed_login_delay: Duration,
    /// USER/PASS and AUTH PLAIN allowed without TLS from non-loopback clients.
    pub allow_plaintext: bool,
}

/// Accepts POP3 connections on `listener` forever; with `implicit_tls`
/// each starts with a TLS handshake (port 995 style).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    implicit_tls: bool,
) {
    let _ = (&shared, implicit_tls);
    let mut acceptor = Acceptor::new(listener, if implicit_tls { "pop3s" } else { "pop3" });
    loop {
        let (mut tcp, _peer) = acceptor.accept().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        tokio::spawn(async move {
            let _ = tcp
                .write_all(b"-ERR [SYS/TEMP] not implemented yet\r\n")
                .await;
            drop(permit);
        });
    }
}
