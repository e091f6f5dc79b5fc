//! `corvidctl cluster`: membership and status over the peer protocol.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use corvid_registry::peer::{
    AdminRequest, AdminResponse, NodeStatus, PeerClient, PeerRequest, PeerResponse,
};

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

async fn call(peer: &str, request: AdminRequest) -> anyhow::Result<AdminResponse> {
    let mut c = PeerClient::new(peer);
    match c
        .call(&PeerRequest::Admin(request), Duration::from_secs(1800))
        .await
        .with_context(|| format!("asking {peer}"))?
    {
        PeerResponse::Admin(r) => Ok(r),
        other => bail!("unexpected answer from {peer}: {other:?}"),
    }
}

async fn status(peer: &str) -> anyhow::Result<NodeStatus> {
    match call(peer, AdminRequest::Status).await? {
        AdminResponse::Status(s) => Ok(s),
        other => bail!("unexpected answer from {peer}: {other:?}"),
    }
}

/// Runs one cluster command against the node at `peer`.
pub async fn run(peer: &str, cmd: ClusterCmd) -> anyhow::Result<()> {
    let request = match cmd {
        ClusterCmd::Status => return print_status(peer).await,
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
    call(peer, request).await?;
    println!("done");
    Ok(())
}

async fn print_status(peer: &str) -> anyhow::Result<()> {
    let here = status(peer).await?;
    // The leader's view has every member's matched index.
    let leader_view = match here.leader.and_then(|l| here.nodes.get(&l)) {
        Some(addr) if here.leader != Some(here.id) => status(addr).await.ok(),
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
            status(addr).await
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
