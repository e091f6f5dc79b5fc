//! Corvid's registry: a Raft-backed MUPDATE master for a Cyrus IMAP Murder.
//!
//! * [`model`]: mailbox entries, registry commands and the one `apply`.
//! * [`store`]: RocksDB storage behind openraft's traits.
//! * [`raft`]: the Raft node and the [`raft::Registry`] handle.
//! * [`stream`]: the log stream masters serve; [`replica`]: the replicas
//!   that follow it (and the in-process lookup API for proxies).
//! * [`directory`]: a master or a replica, as MUPDATE sessions see it.
//! * [`mupdate`]: the protocol codec, server and client.
//! * [`auth`]: credentials and SASL; [`users`]: managing the replicated
//!   users; [`tls`]: rustls set-up.
//! * [`config`], [`daemon`], [`metrics`]: running a node.

pub mod auth;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod directory;
pub mod metrics;
pub mod model;
pub mod mupdate;
pub mod net;
pub mod peer;
pub mod raft;
pub mod replica;
pub mod store;
pub mod stream;
pub mod tls;
pub mod users;
