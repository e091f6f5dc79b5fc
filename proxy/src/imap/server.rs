//! The IMAP listeners: plain (with STARTTLS) and implicit TLS. Each
//! connection becomes a [`session`](crate::imap::session) task; above
//! `imap.max_sessions` a connection gets `* BYE` at once.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::imap::session::{self, Shared};
use crate::listen::{self, Listener};

/// Accepts IMAP connections on `listener` forever. With `implicit_tls`,
/// each connection starts with a TLS handshake (port 993 style).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    implicit_tls: bool,
) {
    let how = Listener {
        name: if implicit_tls { "imaps" } else { "imap" },
        protocol: "imap",
        slots,
        tls: if implicit_tls {
            shared.tls.clone()
        } else {
            None
        },
        refusal: b"* BYE Too many sessions; try again later\r\n",
    };
    listen::serve(listener, how, move |stream, peer| {
        session::run(shared.clone(), stream, peer)
    })
    .await
}
