//! Corvid's proxy: the Murder's frontend role. Clients log in here; every
//! mailbox is looked up in an embedded replica ([`corvid_registry::replica`])
//! and its traffic passed to the Cyrus backend that holds it.
//!
//! * [`imap`]: the IMAP codec (pure) and the client sessions.
//! * [`namespace`]: internal mailbox names and what a user sees.

pub mod imap;
pub mod namespace;
