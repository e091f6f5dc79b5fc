//! Corvid's registry: a Raft-backed MUPDATE master for a Cyrus IMAP Murder.
//!
//! * [`model`]: mailbox entries, registry commands and the one `apply`.
//! * [`store`]: RocksDB storage behind openraft's traits.
//! * [`raft`]: the Raft node and the [`raft::Registry`] handle.
//! * [`mupdate`]: the protocol codec, server and client.
//! * [`auth`]: credentials and SASL; [`tls`]: rustls set-up.
//! * [`config`], [`daemon`], [`metrics`]: running a node.

pub mod auth;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod model;
pub mod mupdate;
pub mod peer;
pub mod raft;
pub mod store;
pub mod tls;
