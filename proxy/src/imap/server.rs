//! The IMAP listeners: plain (with STARTTLS) and implicit TLS. Each
//! connection becomes a [`session`](crate::imap::session) task; above
//! `imap.max_sessions` a connection gets `* BYE` at once.

use std::sync::Arc;
use std::time::Duration;

use corvid_registry::net::Acceptor;
use corvid_registry::tls::MaybeTls;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::imap::session::{self, Shared};

/// Accepts IMAP connections on `listener` forever. With `implicit_tls`,
/// each connection starts with a TLS handshake (port 993 style).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    implicit_tls: bool,
) {
    let name = if implicit_tls { "imaps" } else { "imap" };
    let mut acceptor = Acceptor::new(listener, name);
    loop {
        let (mut tcp, peer) = acceptor.accept().await;
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("corvid_proxy_sessions_refused_total", "protocol" => "imap")
                .increment(1);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    tcp.write_all(b"* BYE Too many sessions; try again later\r\n"),
                )
                .await;
            });
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let stream = if implicit_tls {
                let Some(tls) = shared.tls.clone() else {
                    return;
                };
                let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
                match tokio::time::timeout(Duration::from_secs(30), handshake).await {
                    Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                    _ => return,
                }
            } else {
                MaybeTls::Plain(tcp)
            };
            session::run(shared, stream, peer).await;
            drop(permit);
        });
    }
}
