//! IMAP: the pure codec ([`codec`], [`command`]) and the tasks that own
//! sockets ([`server`] accepts, [`session`] serves one client).

pub mod codec;
pub mod command;
pub mod server;
pub mod session;
