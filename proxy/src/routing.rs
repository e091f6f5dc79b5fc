//! The one routing lookup every proxy protocol calls: a mailbox's internal
//! name → its location (`server!partition`) in the embedded replica → the
//! backend that serves it.
//!
//! Lookups read the replica's local database and never touch the network,
//! so they go on while no master is reachable. A lookup that misses, or
//! finds a mailbox that is only reserved (being created or moved), first
//! waits (bounded) for the replica to catch up with the masters: the
//! mailbox may have just been created through another frontend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use corvid_registry::model::{MailboxEntry, MailboxState};
use corvid_registry::raft::RegistryError;
use corvid_registry::replica::Replica;
use thiserror::Error;

/// Default IMAP port when a backend address names none.
pub const IMAP_PORT: u16 = 143;

/// A backend's address as Cyrus writes it: `host[:port][/tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    /// Host name or address.
    pub host: String,
    /// TCP port (143 when not given).
    pub port: u16,
    /// Use STARTTLS towards it.
    pub tls: bool,
}

/// Why an address does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    /// Empty host.
    #[error("empty host")]
    EmptyHost,
    /// Port is not a number in 1..=65535.
    #[error("bad port {0:?}")]
    BadPort(String),
    /// An option other than `/tls` or `/noauth`.
    #[error("unknown option /{0} (expected /tls)")]
    UnknownOption(String),
}

impl BackendAddr {
    /// Parses `host[:port][/tls]`; `[v6]:port` is accepted too.
    pub fn parse(text: &str) -> Result<BackendAddr, AddrError> {
        let mut parts = text.split('/');
        let hostport = parts.next().unwrap_or("");
        let mut tls = false;
        for opt in parts {
            match opt {
                "tls" => tls = true,
                // Cyrus's /noauth: the proxy always authenticates; accepted
                // so a copied servername does not fail.
                "noauth" => {}
                other => return Err(AddrError::UnknownOption(other.into())),
            }
        }
        let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or(AddrError::EmptyHost)?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(AddrError::EmptyHost);
        }
        let port = match port {
            None => IMAP_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(AddrError::BadPort(p.into())),
            },
        };
        Ok(BackendAddr {
            host: host.into(),
            port,
            tls,
        })
    }

    /// `host:port`, for connecting.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One backend's addresses, per protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddrs {
    /// Its imapd.
    pub imap: BackendAddr,
    /// Its lmtpd.
    pub lmtp: BackendAddr,
    /// Its pop3d.
    pub pop3: BackendAddr,
}

/// A backend service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// IMAP.
    Imap,
    /// LMTP.
    Lmtp,
    /// POP3.
    Pop3,
}

/// Where a mailbox lives.
#[derive(Debug, Clone)]
pub struct Route {
    /// The registry's entry (name, location, ACL, state).
    pub entry: MailboxEntry,
    /// The server part of the location.
    pub server: String,
    /// How to reach it.
    pub addr: Arc<BackendAddr>,
}

/// Why a mailbox cannot be routed.
#[derive(Debug, Error)]
pub enum RouteError {
    /// No such mailbox, even after catching up.
    #[error("mailbox does not exist")]
    NotFound,
    /// Still only reserved after catching up: being created or moved.
    #[error("mailbox is being created or moved; try again")]
    Reserved,
    /// The location names a server the proxy has no address for.
    #[error("mailbox is on server {0:?}, which this proxy does not know")]
    UnknownServer(String),
    /// The replica cannot answer (never synchronised, storage error).
    #[error("{0}")]
    Registry(#[from] RegistryError),
}

/// How a lookup went, for the `corvid_proxy_lookups_total{result}` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// Found active at once.
    Hit,
    /// Found active after waiting for the replica.
    Waited,
    /// Not found (or still reserved) after waiting.
    Miss,
}

impl LookupResult {
    fn label(self) -> &'static str {
        match self {
            LookupResult::Hit => "hit",
            LookupResult::Waited => "waited",
            LookupResult::Miss => "miss",
        }
    }
}

/// The routing table: the embedded replica plus the backends' addresses.
/// Cheap to clone.
#[derive(Clone)]
pub struct Router {
    replica: Replica,
    backends: Arc<BTreeMap<String, [Arc<BackendAddr>; 3]>>,
    sync_wait: Duration,
}

impl Router {
    /// A router over `replica` with `backends` (server name → addresses).
    pub fn new(
        replica: Replica,
        backends: BTreeMap<String, ServerAddrs>,
        sync_wait: Duration,
    ) -> Router {
        Router {
            replica,
            backends: Arc::new(
                backends
                    .into_iter()
                    .map(|(k, v)| (k, [Arc::new(v.imap), Arc::new(v.lmtp), Arc::new(v.pop3)]))
                    .collect(),
            ),
            sync_wait,
        }
    }

    /// The address of `service` on server `name`, if configured.
    pub fn service(&self, name: &str, service: Service) -> Option<Arc<BackendAddr>> {
        let at = match service {
            Service::Imap => 0,
            Service::Lmtp => 1,
            Service::Pop3 => 2,
        };
        self.backends.get(name).map(|a| a[at].clone())
    }

    /// The embedded replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The IMAP address of server `name`, if configured.
    pub fn backend(&self, name: &str) -> Option<Arc<BackendAddr>> {
        self.service(name, Service::Imap)
    }

    /// Routes the mailbox with internal name `name`.
    pub async fn locate(&self, name: &str) -> Result<Route, RouteError> {
        let (found, result) = match self.replica.lookup(name)? {
            Some(e) if e.state == MailboxState::Active => (Some(e), LookupResult::Hit),
            _ => {
                // Missing or reserved: perhaps created or moved a moment ago
                // through another frontend. Catch up, bounded, then decide.
                self.replica.sync(self.sync_wait).await;
                match self.replica.lookup(name)? {
                    Some(e) if e.state == MailboxState::Active => (Some(e), LookupResult::Waited),
                    Some(_) => {
                        metrics::counter!("corvid_proxy_lookups_total", "result" => "miss")
                            .increment(1);
                        return Err(RouteError::Reserved);
                    }
                    None => (None, LookupResult::Miss),
                }
            }
        };
        metrics::counter!("corvid_proxy_lookups_total", "result" => result.label()).increment(1);
        let entry = found.ok_or(RouteError::NotFound)?;
        self.route_entry(entry)
    }

    /// Looks `name` up without waiting (for listings and existence checks
    /// where a stale answer is acceptable).
    pub fn peek(&self, name: &str) -> Result<Option<MailboxEntry>, RegistryError> {
        self.replica.lookup(name)
    }

    /// Waits (bounded) until the replica shows `name` active at a location,
    /// e.g. after a CREATE the backend reported done (read your own writes).
    pub async fn wait_active(&self, name: &str, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(Some(e)) = self.replica.lookup(name) {
                if e.state == MailboxState::Active {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            self.replica.sync(self.sync_wait.min(deadline)).await;
            if let Ok(Some(e)) = self.replica.lookup(name) {
                if e.state == MailboxState::Active {
                    return true;
                }
            }
            // The masters may not have the change yet either (the backend
            // reports it after answering): wake on the next applied change.
            let mut watch = self.replica.watch();
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), watch.recv()).await;
        }
    }

    /// Waits (bounded) until the replica no longer has `name`.
    pub async fn wait_gone(&self, name: &str, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if matches!(self.replica.lookup(name), Ok(None)) {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            self.replica.sync(self.sync_wait.min(deadline)).await;
            let mut watch = self.replica.watch();
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), watch.recv()).await;
        }
    }

    /// Every mailbox whose internal name starts with `prefix`, in Cyrus's
    /// order.
    pub fn list(&self, prefix: &str) -> Result<Vec<MailboxEntry>, RegistryError> {
        self.replica.list_names(prefix)
    }

    fn route_entry(&self, entry: MailboxEntry) -> Result<Route, RouteError> {
        let server = entry.server().to_string();
        let addr = self
            .backend(&server)
            .ok_or_else(|| RouteError::UnknownServer(server.clone()))?;
        Ok(Route {
            entry,
            server,
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses_parse_the_cyrus_way() {
        let a = BackendAddr::parse("be1.example:1143/tls").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("be1.example", 1143, true)
        );
        let a = BackendAddr::parse("127.0.0.2").unwrap();
        assert_eq!((a.port, a.tls), (143, false));
        assert_eq!(a.host_port(), "127.0.0.2:143");
        let a = BackendAddr::parse("[::1]:1143").unwrap();
        assert_eq!(a.host_port(), "[::1]:1143");
        assert_eq!(
            BackendAddr::parse("h:0"),
            Err(AddrError::BadPort("0".into()))
        );
        assert_eq!(BackendAddr::parse(":12"), Err(AddrError::EmptyHost));
        assert_eq!(
            BackendAddr::parse("h/ssl"),
            Err(AddrError::UnknownOption("ssl".into()))
        );
    }
}
