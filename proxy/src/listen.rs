//! The accept loop every client protocol shares: connections over the
//! session cap get the protocol's refusal line at once, implicit-TLS ports
//! shake hands first, and each connection runs its session in a task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use corvid_registry::net::Acceptor;
use corvid_registry::tls::MaybeTls;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How one listener treats its connections.
pub struct Listener {
    /// Label for metrics and logs (`imap`, `imaps`, `pop3`, …).
    pub name: &'static str,
    /// Protocol label of `corvid_proxy_sessions_refused_total`.
    pub protocol: &'static str,
    /// At most this many sessions at once (shared by a protocol's ports).
    pub slots: Arc<Semaphore>,
    /// Implicit TLS: a handshake before the session starts.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Written (in plaintext, even on a TLS port: a handshake per refused
    /// connection is what an overload cannot afford) above the cap.
    pub refusal: &'static [u8],
}

/// Accepts on `listener` forever, running `session` for each connection.
pub async fn serve<F, Fut>(listener: TcpListener, how: Listener, session: F)
where
    F: Fn(MaybeTls, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let session = Arc::new(session);
    let mut acceptor = Acceptor::new(listener, how.name);
    loop {
        let (mut tcp, peer) = acceptor.accept().await;
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = how.slots.clone().try_acquire_owned() else {
            metrics::counter!("corvid_proxy_sessions_refused_total", "protocol" => how.protocol)
                .increment(1);
            let refusal = how.refusal;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(refusal)).await;
            });
            continue;
        };
        let (session, tls) = (session.clone(), how.tls.clone());
        tokio::spawn(async move {
            let stream = match tls {
                Some(tls) => {
                    let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                        _ => return,
                    }
                }
                None => MaybeTls::Plain(tcp),
            };
            session(stream, peer).await;
            drop(permit);
        });
    }
}
