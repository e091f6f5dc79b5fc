//! Listener plumbing shared by the MUPDATE, peer and metrics ports: an
//! accept loop that survives `accept()` errors, and the start-time check of
//! the process's descriptor limit.
//!
//! No network input may stop a node. `accept()` fails when the process runs
//! out of descriptors (`EMFILE`, `ENFILE`) or memory (`ENOBUFS`, `ENOMEM`);
//! those errors are counted in `corvid_accept_errors_total{listener=...}`,
//! logged, and answered by a pause (50 ms, doubling to 500 ms) before the
//! next attempt, so that the loop neither spins nor gives up. Errors that
//! concern one connection only (the peer reset it before it was accepted)
//! are counted and skipped at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

/// First pause after a failed `accept()`.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between failed `accept()`s.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Descriptors kept out of every connection cap: RocksDB's files and WAL,
/// outgoing peer connections, the metrics endpoint, stdio and log files.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The pause after `previous` (none: the first failure in a row).
pub fn next_backoff(previous: Option<Duration>) -> Duration {
    match previous {
        None => ACCEPT_BACKOFF_MIN,
        Some(d) => (d * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX),
    }
}

/// Whether an `accept()` error concerns only the connection being accepted
/// (retry at once) rather than the process (back off).
pub fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// A listener whose [`Acceptor::accept`] never fails.
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    backoff: Option<Duration>,
}

impl Acceptor {
    /// Wraps `listener`; `name` labels its metric and log lines
    /// (`mupdate`, `peer`, `metrics`).
    pub fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            backoff: None,
        }
    }

    /// The next connection. Errors are counted, logged and retried (after a
    /// pause when they concern the whole process).
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(conn) => {
                    if self.backoff.take().is_some() {
                        tracing::info!(listener = self.name, "accepting connections again");
                    }
                    return conn;
                }
                Err(e) => {
                    metrics::counter!("corvid_accept_errors_total", "listener" => self.name)
                        .increment(1);
                    if is_per_connection(&e) {
                        tracing::debug!(listener = self.name, "accept: {e}");
                        continue;
                    }
                    let pause = next_backoff(self.backoff);
                    self.backoff = Some(pause);
                    tracing::warn!(
                        listener = self.name,
                        "accept failed: {e}; retrying in {} ms",
                        pause.as_millis()
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Why the descriptor limit does not fit the configured connection caps.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FdLimitError {
    /// Not even the reserve and a handful of MUPDATE connections fit.
    #[error(
        "the open-file limit (RLIMIT_NOFILE) is {limit}: too low for {peer} peer connections, \
         {reserved} descriptors for RocksDB, outgoing peers and metrics, and at least {min} \
         MUPDATE connections; raise it (ulimit -n, LimitNOFILE= in systemd) or lower \
         raft.max_peer_connections"
    )]
    TooLow {
        /// The soft limit.
        limit: u64,
        /// The peer connection cap.
        peer: u64,
        /// [`RESERVED_DESCRIPTORS`].
        reserved: u64,
        /// The fewest MUPDATE connections a node starts with.
        min: u64,
    },
}

/// The fewest MUPDATE connections the descriptor check lowers the cap to.
pub const MIN_MUPDATE_CONNECTIONS: u64 = 16;

/// Fits `max_connections` MUPDATE connections and `peer_connections` peer
/// connections into the descriptor limit `limit`, keeping
/// [`RESERVED_DESCRIPTORS`] free. Returns the MUPDATE cap to use: the
/// configured one when it fits, else a lower one (the caller warns), or an
/// error when fewer than [`MIN_MUPDATE_CONNECTIONS`] would fit.
pub fn fit_connection_caps(
    limit: u64,
    max_connections: usize,
    peer_connections: usize,
) -> Result<usize, FdLimitError> {
    let peer = peer_connections as u64;
    let room = limit
        .saturating_sub(RESERVED_DESCRIPTORS)
        .saturating_sub(peer);
    if room < MIN_MUPDATE_CONNECTIONS {
        return Err(FdLimitError::TooLow {
            limit,
            peer,
            reserved: RESERVED_DESCRIPTORS,
            min: MIN_MUPDATE_CONNECTIONS,
        });
    }
    Ok(usize::try_from(room).map_or(max_connections, |room| max_connections.min(room)))
}

/// The process's soft `RLIMIT_NOFILE`; `None` when unlimited or unknown.
pub fn open_file_limit() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (rc == 0 && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_from_50_to_500_ms() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = next_backoff(d);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(seen, [50, 100, 200, 400, 500, 500, 500, 500]);
    }

    #[test]
    fn descriptor_exhaustion_backs_off_but_resets_do_not() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!is_per_connection(&emfile));
        assert!(!is_per_connection(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(is_per_connection(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    #[test]
    fn caps_fit_the_descriptor_limit() {
        // Plenty of room: unchanged.
        assert_eq!(fit_connection_caps(1 << 20, 4096, 256), Ok(4096));
        // 256 descriptors: 64 reserved, 32 for peers, 160 for MUPDATE.
        assert_eq!(fit_connection_caps(256, 4096, 32), Ok(160));
        // Too few for anything useful: refuse.
        assert!(matches!(
            fit_connection_caps(100, 4096, 32),
            Err(FdLimitError::TooLow { limit: 100, .. })
        ));
    }
}
