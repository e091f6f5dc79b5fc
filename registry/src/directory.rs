//! What a MUPDATE session reads and writes: a master node or a replica.
//!
//! Masters read linearizably (or locally, as configured) and commit writes
//! through Raft; replicas read their local copy and forward writes to a
//! master. Sessions see one interface and do not care which.

use std::time::Duration;

use crate::model::{ClientTag, MailboxEntry, Outcome, RegistryCommand};
use crate::raft::{Registry, RegistryError};
use crate::replica::Replica;
use crate::store::Store;

/// The registry as a MUPDATE session sees it.
#[derive(Clone)]
pub enum Directory {
    /// A Raft master node.
    Master(Registry),
    /// A replica following the masters' log stream.
    Replica(Replica),
}

impl Directory {
    /// The mailbox named `name`.
    pub async fn find(&self, name: &str) -> Result<Option<MailboxEntry>, RegistryError> {
        match self {
            Directory::Master(r) => r.find(name).await,
            Directory::Replica(r) => r.lookup(name),
        }
    }

    /// The mailboxes whose location starts with `prefix`, in Cyrus's order.
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<MailboxEntry>, RegistryError> {
        match self {
            Directory::Master(r) => r.list(prefix).await,
            Directory::Replica(r) => r.list_locations(prefix.unwrap_or("")),
        }
    }

    /// Commits `command`, request `client` of its session (a replica has a
    /// master do it).
    pub async fn write(
        &self,
        client: ClientTag,
        command: RegistryCommand,
    ) -> Result<Outcome, RegistryError> {
        match self {
            Directory::Master(r) => r.write_as(client, command).await,
            Directory::Replica(r) => r.write(client, command).await,
        }
    }

    /// Waits until this node has applied every change the cluster had
    /// committed when asked (NOOP on an UPDATE stream is such a point: a
    /// Cyrus frontend sends it after a CREATE and expects the new mailbox
    /// before the OK). Returns whether it got there; a replica gives up
    /// after `replica_timeout` and answers with what it has.
    pub async fn sync_point(&self, replica_timeout: Duration) -> bool {
        match self {
            Directory::Master(r) => r.read_barrier().await.is_ok(),
            Directory::Replica(r) => r.sync(replica_timeout).await,
        }
    }

    /// Waits until local reads reflect what they must (on a master, every
    /// write acknowledged before the call; a replica serves its copy as is).
    pub async fn read_barrier(&self) -> Result<(), RegistryError> {
        match self {
            Directory::Master(r) => r.read_barrier().await,
            Directory::Replica(r) if r.synchronised() => Ok(()),
            Directory::Replica(_) => Err(RegistryError::Synchronising),
        }
    }

    /// The local store (dumps and change subscriptions).
    pub fn store(&self) -> &Store {
        match self {
            Directory::Master(r) => r.store(),
            Directory::Replica(r) => r.store(),
        }
    }

    /// Stops Raft or the stream follower.
    pub async fn shutdown(&self) {
        match self {
            Directory::Master(r) => r.shutdown().await,
            Directory::Replica(r) => r.shutdown(),
        }
    }
}
