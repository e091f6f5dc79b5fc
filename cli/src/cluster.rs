//! `corvidctl cluster`: membership and status over the peer protocol.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use corvid_registry::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerRequest, PeerResponse,
};

/// Mutual TLS towards the peer port, when the cluster uses it.
#[derive(Debug, clap::Args)]
pub struct PeerTlsArgs {
    /// PEM certificate signed by the cluster CA.
    #[arg(long, requires_all = ["peer_key", "peer_ca"])]
    peer_cert: Option<std::path::PathBuf>,
    /// PEM private key of --peer-cert.
    #[arg(long)]
    peer_key: Option<std::path::PathBuf>,
    /// PEM cluster CA.
    #[arg(long)]
    peer_ca: Option<std::path::PathBuf>,
}

impl PeerTlsArgs {
    /// The client side of mutual TLS, when the three options are set.
    pub fn client(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        match (&self.peer_cert, &self.peer_key, &self.peer_ca) {
            (Some(c), Some(k), Some(a)) => {
                Ok(Some(corvid_registry::tls::peer_tls(c, k, a)?.client))
            }
            _ => Ok(None),
        }
    }
}

/// Cluster administration commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialize a new cluster; every member is ID=HOST:PORT (its peer address).
    Init {
        /// Voters, e.g. 1=10.0.0.1:3906 2=10.0.0.2:3906 3=10.0.0.3:3906
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add a node as a learner (it catches up, by snapshot if needed).
    AddLearner {
        /// Node id.
        id: u64,
        /// Its peer address HOST:PORT.
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node id.
        id: u64,
    },
    /// Remove a voter or learner.
    Remove {
        /// Node id.
        id: u64,
    },
    /// Show every member's role, term, indexes and replication lag.
    Status,
}

type Tls = Option<std::sync::Arc<rustls::ClientConfig>>;

async fn call(peer: &str, tls: &Tls, request: AdminRequest) -> anyhow::Result<AdminResponse> {
    let mut c = PeerClient::with_tls(peer, tls.clone());
    match c
        .call(&PeerRequest::Admin(request), Duration::from_secs(1800))
        .await
        .with_context(|| format!("asking {peer}"))?
    {
        PeerResponse::Admin(r) => Ok(r),
        other => bail!("unexpected answer from {peer}: {other:?}"),
    }
}

async fn status(peer: &str, tls: &Tls) -> anyhow::Result<NodeStatus> {
    match call(peer, tls, AdminRequest::Status).await? {
        AdminResponse::Status(s) => Ok(s),
        other => bail!("unexpected answer from {peer}: {other:?}"),
    }
}

/// Runs one cluster command against the node at `peer`.
pub async fn run(peer: &str, tls: &PeerTlsArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    let tls = tls.client()?;
    let request = match cmd {
        ClusterCmd::Status => return print_status(peer, &tls).await,
        ClusterCmd::Init { members } => {
            let members = members
                .iter()
                .map(|m| {
                    let (id, addr) = m.split_once('=').context("members are ID=HOST:PORT")?;
                    Ok((
                        id.parse::<u64>().context("node id must be a number")?,
                        addr.to_owned(),
                    ))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            AdminRequest::Init { members }
        }
        ClusterCmd::AddLearner { id, addr } => AdminRequest::AddLearner { id, addr },
        ClusterCmd::Promote { id } => AdminRequest::Promote { id },
        ClusterCmd::Remove { id } => AdminRequest::Remove { id },
    };
    call(peer, &tls, request).await?;
    println!("done");
    Ok(())
}

async fn print_status(peer: &str, tls: &Tls) -> anyhow::Result<()> {
    let here = status(peer, tls).await?;
    if !here.member {
        println!(
            "node {} ({peer}) is not a member of the registry cluster (removed, or never added)",
            here.id
        );
    }
    // The leader's view has every member's matched index.
    let leader_view = match here.leader.and_then(|l| here.nodes.get(&l)) {
        Some(addr) if here.leader != Some(here.id) => status(addr, tls).await.ok(),
        _ => Some(here.clone()),
    };
    println!(
        "{:>4} {:<22} {:<10} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8}",
        "id", "peer", "role", "term", "leader", "last log", "applied", "matched", "lag"
    );
    for (id, addr) in &here.nodes {
        let s = if *id == here.id {
            Ok(here.clone())
        } else {
            status(addr, tls).await
        };
        let voter = here.voters.contains(id);
        let (matched, lag) = match leader_view
            .as_ref()
            .and_then(|l| l.matched.get(id).map(|m| (l, m)))
        {
            Some((l, Some(m))) => (
                m.to_string(),
                l.last_log_index.saturating_sub(*m).to_string(),
            ),
            _ => ("-".into(), "-".into()),
        };
        match s {
            Ok(s) => println!(
                "{:>4} {:<22} {:<10} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8}",
                id,
                addr,
                if voter {
                    s.role.clone()
                } else {
                    format!("{} (learner)", s.role)
                },
                s.term,
                s.leader.map_or("-".into(), |l| l.to_string()),
                s.last_log_index,
                s.applied_index,
                matched,
                lag
            ),
            Err(e) => println!("{id:>4} {addr:<22} unreachable: {e:#}"),
        }
    }
    Ok(())
}
