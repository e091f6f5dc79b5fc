//! IMAP: the pure codec ([`codec`], [`command`]) and the tasks that own
//! sockets.

pub mod codec;
pub mod command;
