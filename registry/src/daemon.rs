//! Starting a registry node: storage, Raft, credentials, and the listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::auth::{CredentialStore, SaslServer};
use crate::config::{Config, Role};
use crate::directory::Directory;
use crate::mupdate::codec::Limits;
use crate::mupdate::server::{self, ServerContext, ServerSettings};
use crate::raft::Registry;
use crate::replica::{Replica, ReplicaSettings};
use crate::users::UserAdmin;

/// A started node.
pub struct Running {
    /// Where MUPDATE listens.
    pub mupdate_addr: SocketAddr,
    /// Where the peer protocol listens (masters only).
    pub peer_addr: Option<SocketAddr>,
    /// The registry, master or replica.
    pub directory: Directory,
    /// The MUPDATE accept loop (it ends only if it panics).
    pub mupdate_task: tokio::task::JoinHandle<()>,
    /// The MUPDATE connection cap in effect: `mupdate.max_connections`,
    /// lowered if the descriptor limit does not leave room for it.
    pub max_connections: usize,
    /// Where the first administrator's password was written, when this
    /// start created it (see [`crate::users::create_first_admin`]).
    pub first_admin_credential: Option<std::path::PathBuf>,
}

/// Name of the administrator created on first start.
pub use crate::users::FIRST_ADMIN;

/// Starts the node as `config` says: Raft (master) or the log-stream
/// follower (replica), then the MUPDATE listener.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let max_connections = fit_descriptor_limit(config)?;
    if config.peer_port_insecure() {
        tracing::warn!(
            peer_listen = %config.raft.peer_listen,
            "raft.allow_insecure_peer: the peer port listens beyond loopback WITHOUT mutual TLS; \
             anyone who reaches it can act as a cluster member"
        );
    }
    let listener = TcpListener::bind(config.mupdate.listen)
        .await
        .with_context(|| format!("binding MUPDATE listener {}", config.mupdate.listen))?;
    let mupdate_addr = listener.local_addr()?;
    let (directory, peer_addr, credentials, first_admin_credential) = match config.node.role {
        Role::Master => {
            let (registry, peer_addr, credentials) = start_master(config).await?;
            // A single node made by bootstrap creates its administrator
            // itself; a cluster's comes from `corvidctl cluster init`.
            let first_admin = if config.raft.bootstrap {
                crate::users::create_first_admin(&registry, &credentials, &config.node.data_dir)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!("could not create the first administrator: {e}");
                        None
                    })
            } else {
                None
            };
            (
                Directory::Master(registry),
                Some(peer_addr),
                credentials,
                first_admin,
            )
        }
        Role::Replica => {
            let replica = start_replica(config)?;
            let credentials = Arc::new(CredentialStore::with_registry(
                config.users_file(),
                replica.store().clone(),
            ));
            (Directory::Replica(replica), None, credentials, None)
        }
    };
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    let m = &config.mupdate;
    let settings = ServerSettings {
        server_name: config.node.server_name.clone(),
        max_connections,
        max_unauthenticated: m.max_unauthenticated.min(max_connections),
        idle_timeout: Duration::from_secs(m.idle_timeout_secs),
        login_timeout: Duration::from_secs(m.login_timeout_secs),
        max_parallel_auth: match m.max_parallel_auth {
            0 => server::default_parallel_auth(),
            n => n,
        },
        failed_auth_delay: Duration::from_millis(m.failed_auth_delay_ms),
        allow_plaintext: m.allow_plaintext,
        limits: Limits {
            max_line: m.max_line_bytes,
            max_literal: m.max_literal_bytes,
            ..Limits::default()
        },
    };
    let ctx = Arc::new(ServerContext::new(
        directory.clone(),
        SaslServer::new(credentials),
        tls,
        settings,
    ));
    let mupdate_task = tokio::spawn(server::serve(listener, ctx));
    Ok(Running {
        mupdate_addr,
        peer_addr,
        directory,
        mupdate_task,
        max_connections,
        first_admin_credential,
    })
}

/// Checks the connection caps against the process's open-file limit: the
/// MUPDATE cap is lowered (with a warning) when the limit leaves fewer than
/// [`crate::net::RESERVED_DESCRIPTORS`] descriptors beside the MUPDATE and
/// peer caps, and the node refuses to start when even a small cap does not
/// fit.
fn fit_descriptor_limit(config: &Config) -> anyhow::Result<usize> {
    let wanted = config.mupdate.max_connections;
    let peers = match config.node.role {
        Role::Master => config.raft.max_peer_connections,
        Role::Replica => 0,
    };
    let Some(limit) = crate::net::open_file_limit() else {
        return Ok(wanted);
    };
    let fitted = crate::net::fit_connection_caps(limit, wanted, peers)?;
    if fitted < wanted {
        tracing::warn!(
            open_file_limit = limit,
            raft.max_peer_connections = peers,
            "mupdate.max_connections lowered from {wanted} to {fitted} so that {} descriptors \
             stay free for RocksDB, peers and metrics; raise the open-file limit (ulimit -n, \
             LimitNOFILE=) to allow more",
            crate::net::RESERVED_DESCRIPTORS
        );
    }
    Ok(fitted)
}

/// Raft, its store, the node's users (registry, then file) and the peer
/// listener.
async fn start_master(
    config: &Config,
) -> anyhow::Result<(Registry, SocketAddr, Arc<CredentialStore>)> {
    let data_dir = &config.node.data_dir;
    let peer_listener = TcpListener::bind(config.raft.peer_listen)
        .await
        .with_context(|| format!("binding peer listener {}", config.raft.peer_listen))?;
    let peer_addr = peer_listener.local_addr()?;
    let advertise = config
        .raft
        .peer_advertise
        .clone()
        .unwrap_or_else(|| peer_addr.to_string());
    let registry = Registry::start(data_dir, &config.raft, &advertise)
        .await
        .with_context(|| format!("starting the registry in {}", data_dir.display()))?;
    let credentials = Arc::new(CredentialStore::with_registry(
        config.users_file(),
        registry.store().clone(),
    ));
    let users = Arc::new(UserAdmin::new(credentials.clone(), data_dir.clone()));
    tokio::spawn(crate::peer::serve(
        peer_listener,
        registry.clone(),
        registry.peer_server_tls(),
        config.raft.max_peer_connections,
        users,
    ));
    Ok((registry, peer_addr, credentials))
}

/// The replica's store and its log-stream follower.
fn start_replica(config: &Config) -> anyhow::Result<Replica> {
    let r = &config.replica;
    // A replica is a client of the masters' peer port only.
    let tls = config.raft.peer_tls()?.map(|t| t.client);
    let settings = ReplicaSettings {
        masters: r.masters.clone(),
        silence_timeout: Duration::from_millis(r.silence_timeout_ms),
        leaderless_timeout: Duration::from_millis(r.leaderless_timeout_ms),
        write_timeout: Duration::from_millis(r.write_timeout_ms),
        tls,
    };
    let data_dir = &config.node.data_dir;
    Replica::start(data_dir, settings)
        .with_context(|| format!("starting the replica in {}", data_dir.display()))
}
