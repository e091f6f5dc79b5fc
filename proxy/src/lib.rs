//! Corvid's proxy: the Murder's frontend role. Clients log in here; every
//! mailbox is looked up in an embedded replica ([`corvid_registry::replica`])
//! and its traffic passed to the Cyrus backend that holds it.
//!
//! * [`routing`]: the one lookup every protocol calls (mailbox → backend).
//! * [`imap`]: the IMAP codec (pure) and the client sessions.
//! * [`lmtp`]: delivery from the MTA; [`pop3`]: POP3 to the INBOX's backend.
//! * [`backend`]: logged-in connections to Cyrus backends.
//! * [`login`]: password checks (on the backend, or `saslauthd`).
//! * [`namespace`]: internal mailbox names and what a user sees.
//! * [`config`], [`daemon`]: running the proxy.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod imap;
pub mod listen;
pub mod lmtp;
pub mod login;
pub mod namespace;
pub mod pop3;
pub mod routing;
