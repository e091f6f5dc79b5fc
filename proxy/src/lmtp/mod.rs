//! LMTP (RFC 2033): the MTA delivers here; each recipient is looked up in
//! the replica at RCPT time, the message is spooled once and handed to
//! every backend concerned in one LMTP transaction per backend.
