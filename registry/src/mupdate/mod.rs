//! The MUPDATE protocol (RFC 3656 as Cyrus 3.6 speaks it): a pure codec, the
//! server, and an async client.

pub mod client;
pub mod codec;
pub mod server;
