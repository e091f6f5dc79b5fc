//! Starting the proxy: the embedded replica, the routing table, the
//! password check and the listeners, from a validated [`Config`].

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use corvid_registry::replica::{Replica, ReplicaSettings};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backend::BackendSettings;
use crate::config::{Config, LoginCheck};
use crate::imap::codec::Limits;
use crate::imap::session::Shared;
use crate::login::{CheckMethod, PasswordCheck};
use crate::routing::Router;

/// A started proxy.
pub struct Running {
    /// Where plain IMAP listens, if on.
    pub imap_addr: Option<SocketAddr>,
    /// Where implicit-TLS IMAP listens, if on.
    pub imaps_addr: Option<SocketAddr>,
    /// Where LMTP listens on TCP, if on.
    pub lmtp_addr: Option<SocketAddr>,
    /// Where plain POP3 listens, if on.
    pub pop3_addr: Option<SocketAddr>,
    /// Where implicit-TLS POP3 listens, if on.
    pub pop3s_addr: Option<SocketAddr>,
    /// The embedded replica.
    pub replica: Replica,
}

/// Starts everything `config` asks for. Must run inside a Tokio runtime.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let replica = Replica::start(
        &config.proxy.data_dir,
        ReplicaSettings::new(config.replica.masters.clone()),
    )
    .with_context(|| format!("opening the replica in {}", config.proxy.data_dir.display()))?;
    let router = Router::new(
        replica.clone(),
        config.server_addrs()?,
        Duration::from_millis(config.replica.lookup_sync_ms),
    );
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => Some(corvid_registry::tls::server_config(c, k)?),
        _ => None,
    };
    let backend_tls = match &config.backend.tls_ca {
        Some(ca) => Some(client_tls(ca)?),
        None => None,
    };
    let backend = BackendSettings {
        authname: config.backend.authname.clone(),
        password: Arc::new(config.backend_password()?),
        connect_timeout: Duration::from_secs(config.backend.connect_timeout_secs),
        command_timeout: Duration::from_secs(config.backend.command_timeout_secs),
        tls: backend_tls,
        limits: Limits {
            // Backend lines can be long (a FETCH of many envelopes); literals
            // are streamed, so their size costs no memory.
            max_line: 16 * 1024 * 1024,
            max_literal: u64::MAX / 2,
        },
    };
    let method = match config.login.check {
        LoginCheck::Backend => CheckMethod::Backend {
            router: router.clone(),
            namespace: config.namespace(),
            settings: backend.clone(),
            fallback: if config.create.servers.is_empty() {
                config.backends.keys().cloned().collect()
            } else {
                config.create.servers.clone()
            },
        },
        LoginCheck::Saslauthd => CheckMethod::Saslauthd {
            socket: config.login.saslauthd_socket.clone(),
            service: config.login.saslauthd_service.clone(),
        },
    };
    let password_check = PasswordCheck::new(method, Duration::from_secs(config.login.cache_secs));
    let shared = Arc::new(Shared {
        router,
        namespace: config.namespace(),
        password_check,
        backend,
        tls,
        limits: Limits {
            max_line: config.imap.max_line_bytes,
            // The session checks literals against max_literal_bytes itself,
            // where it knows the command's tag; literals are streamed, so
            // the framer's own bound costs no memory.
            max_literal: u64::MAX / 2,
        },
        max_literal: config.imap.max_literal_bytes,
        max_command_bytes: config.imap.max_command_bytes,
        login_timeout: Duration::from_secs(config.imap.login_timeout_secs),
        idle_timeout: Duration::from_secs(config.imap.idle_timeout_secs),
        failed_login_delay: Duration::from_millis(config.imap.failed_login_delay_ms),
        idle_poll: Duration::from_secs(config.imap.idle_poll_secs.max(1)),
        allow_plaintext: config.imap.allow_plaintext,
        admins: config.proxy.admins.clone(),
        create_servers: config.create.servers.clone(),
        select_mode: config.create.select_mode,
        noop_after_idle: Duration::from_secs(config.backend.noop_after_idle_secs),
        next_id: AtomicU64::new(1),
    });
    let slots = Arc::new(Semaphore::new(config.imap.max_sessions));
    let mut running = Running {
        imap_addr: None,
        imaps_addr: None,
        lmtp_addr: None,
        pop3_addr: None,
        pop3s_addr: None,
        replica,
    };
    for (addr, implicit) in [
        (&config.imap.listen, false),
        (&config.imap.tls_listen, true),
    ] {
        if addr.is_empty() {
            continue;
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding IMAP listener {addr}"))?;
        let local = listener.local_addr()?;
        if implicit {
            running.imaps_addr = Some(local);
        } else {
            running.imap_addr = Some(local);
        }
        tokio::spawn(crate::imap::server::serve(
            listener,
            shared.clone(),
            slots.clone(),
            implicit,
        ));
    }
    let lmtp = Arc::new(crate::lmtp::Shared {
        router: shared.router.clone(),
        namespace: config.namespace(),
        backend: shared.backend.clone(),
        hostname: config.lmtp.hostname.clone(),
        max_message_bytes: config.lmtp.max_message_bytes,
        spool_memory_bytes: config.lmtp.spool_memory_bytes,
        spool_dir: config.lmtp.spool_dir.clone(),
        max_recipients: config.lmtp.max_recipients,
        timeout: Duration::from_secs(config.lmtp.timeout_secs),
        postuser: config.lmtp.postuser.clone(),
        next_id: AtomicU64::new(1),
        pool: crate::lmtp::deliver::Pool::new(config.lmtp.backend_pool_size),
    });
    let lmtp_slots = Arc::new(Semaphore::new(config.lmtp.max_sessions));
    if !config.lmtp.listen.is_empty() {
        let listener = TcpListener::bind(&config.lmtp.listen)
            .await
            .with_context(|| format!("binding LMTP listener {}", config.lmtp.listen))?;
        running.lmtp_addr = Some(listener.local_addr()?);
        tokio::spawn(crate::lmtp::serve_tcp(
            listener,
            lmtp.clone(),
            lmtp_slots.clone(),
        ));
    }
    if let Some(path) = &config.lmtp.unix_socket {
        // A socket file left by a previous run would make bind fail.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding LMTP socket {}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = config.lmtp.socket_mode()?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
        }
        tokio::spawn(crate::lmtp::serve_unix(
            listener,
            lmtp.clone(),
            lmtp_slots.clone(),
        ));
    }
    let pop3 = Arc::new(crate::pop3::Shared {
        router: shared.router.clone(),
        namespace: config.namespace(),
        password_check: shared.password_check.clone(),
        backend: shared.backend.clone(),
        tls: shared.tls.clone(),
        login_timeout: Duration::from_secs(config.pop3.login_timeout_secs),
        idle_timeout: Duration::from_secs(config.pop3.idle_timeout_secs),
        failed_login_delay: shared.failed_login_delay,
        allow_plaintext: config.imap.allow_plaintext,
    });
    let pop3_slots = Arc::new(Semaphore::new(config.pop3.max_sessions));
    for (addr, implicit) in [
        (&config.pop3.listen, false),
        (&config.pop3.tls_listen, true),
    ] {
        if addr.is_empty() {
            continue;
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding POP3 listener {addr}"))?;
        let local = listener.local_addr()?;
        if implicit {
            running.pop3s_addr = Some(local);
        } else {
            running.pop3_addr = Some(local);
        }
        tokio::spawn(crate::pop3::serve(
            listener,
            pop3.clone(),
            pop3_slots.clone(),
            implicit,
        ));
    }
    Ok(running)
}

/// A rustls client configuration trusting the CA certificates in `ca`.
fn client_tls(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no certificate found", ca.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
