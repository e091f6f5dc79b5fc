//! `corvid-proxy`: the IMAP frontend daemon.

fn main() {}
