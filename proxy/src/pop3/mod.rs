//! POP3 (RFC 1939, STLS from RFC 2595, AUTH PLAIN from RFC 5034): the
//! client logs in here, the proxy looks up the INBOX in the replica, logs in
//! to that backend's pop3d with proxy authentication, relays its `+OK`, then
//! copies bytes both ways.
//!
//! [`codec`] is the pure part (lines, commands, responses); [`session`]
//! owns the client socket; [`backend`] is the proxy's login on a pop3d.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backend::BackendSettings;
use crate::listen::{self, Listener};
use crate::login::PasswordCheck;
use crate::namespace::Namespace;
use crate::routing::Router;

pub mod backend;
pub mod codec;
pub mod session;

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
/// each starts with a TLS handshake (port 995 style). Above
/// `pop3.max_sessions` a connection gets `-ERR [SYS/TEMP]` at once.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    implicit_tls: bool,
) {
    let how = Listener {
        name: if implicit_tls { "pop3s" } else { "pop3" },
        protocol: "pop3",
        slots,
        tls: if implicit_tls {
            shared.tls.clone()
        } else {
            None
        },
        refusal: b"-ERR [SYS/TEMP] Too many sessions; try again later\r\n",
    };
    listen::serve(listener, how, move |stream, peer| {
        session::run(shared.clone(), stream, peer)
    })
    .await
}
