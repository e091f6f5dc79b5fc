//! Checking a client's password: on the backend of the user's INBOX (with
//! the user's own credentials), or with Cyrus SASL's `saslauthd`.
//!
//! Passwords are never logged: they appear only in the bytes sent to the
//! backend or to `saslauthd`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::backend::{BackendConn, BackendSettings};
use crate::namespace::Namespace;
use crate::routing::Router;

/// Longest user name, password or realm sent to `saslauthd` (its own
/// limit is 256 per field).
const SASLAUTHD_FIELD_MAX: usize = 255;

/// Why a password could not be checked (as opposed to: it was wrong).
#[derive(Debug, Error)]
pub enum CheckError {
    /// `saslauthd` or the backend could not be asked.
    #[error("password check unavailable: {0}")]
    Unavailable(String),
}

/// How passwords are checked, with a short-lived cache of successful
/// checks (so that a client that reconnects often does not cost the
/// backend two logins per session).
#[derive(Clone)]
pub struct PasswordCheck {
    method: CheckMethod,
    cache: Arc<SuccessCache>,
}

/// Successful checks: user → salted SHA-256 of the password and when it
/// expires. Only successes are kept, only in memory, never the password.
struct SuccessCache {
    ttl: Duration,
    salt: [u8; 16],
    entries: Mutex<HashMap<String, ([u8; 32], Instant)>>,
}

/// Most users kept in the cache; it is emptied when it would grow past.
const CACHE_MAX_USERS: usize = 100_000;

impl SuccessCache {
    fn digest(&self, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn hit(&self, user: &str, password: &str) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let digest = self.digest(password);
        let entries = self.entries.lock().expect("cache lock");
        matches!(entries.get(user), Some((d, until)) if *d == digest && Instant::now() < *until)
    }

    fn remember(&self, user: &str, password: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let digest = self.digest(password);
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= CACHE_MAX_USERS {
            entries.clear();
        }
        entries.insert(user.to_string(), (digest, Instant::now() + self.ttl));
    }

    fn forget(&self, user: &str) {
        self.entries.lock().expect("cache lock").remove(user);
    }
}

impl PasswordCheck {
    /// A check by `method`, remembering successes for `cache_ttl` (zero:
    /// no cache).
    pub fn new(method: CheckMethod, cache_ttl: Duration) -> PasswordCheck {
        PasswordCheck {
            method,
            cache: Arc::new(SuccessCache {
                ttl: cache_ttl,
                salt: rand::random(),
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether `password` is `user`'s.
    pub async fn check(&self, user: &str, password: &str) -> Result<bool, CheckError> {
        if self.cache.hit(user, password) {
            metrics::counter!("corvid_proxy_password_cache_hits_total").increment(1);
            return Ok(true);
        }
        let ok = self.method.check(user, password).await?;
        if ok {
            self.cache.remember(user, password);
        } else {
            // A changed password must not go on working from the cache.
            self.cache.forget(user);
        }
        Ok(ok)
    }
}

/// Where passwords are checked.
#[derive(Clone)]
pub enum CheckMethod {
    /// On the backend of the user's INBOX.
    Backend {
        /// Routing, to find the INBOX.
        router: Router,
        /// Naming, to know the INBOX's internal name.
        namespace: Namespace,
        /// How to reach backends.
        settings: BackendSettings,
        /// Servers tried, in order, for users without an INBOX (e.g.
        /// administrators).
        fallback: Vec<String>,
    },
    /// With `saslauthd`.
    Saslauthd {
        /// Its UNIX socket.
        socket: PathBuf,
        /// Service name sent with each request.
        service: String,
    },
}

impl CheckMethod {
    /// Asks the backend or saslauthd whether `password` is `user`'s.
    pub async fn check(&self, user: &str, password: &str) -> Result<bool, CheckError> {
        match self {
            CheckMethod::Saslauthd { socket, service } => {
                let (login, realm) = user.split_once('@').unwrap_or((user, ""));
                tokio::time::timeout(
                    Duration::from_secs(10),
                    saslauthd(socket, login, password, service, realm),
                )
                .await
                .map_err(|_| CheckError::Unavailable("saslauthd did not answer".into()))?
            }
            CheckMethod::Backend {
                router,
                namespace,
                settings,
                fallback,
            } => {
                let inbox = namespace
                    .inbox(user)
                    .map_err(|_| CheckError::Unavailable("user name not valid here".into()));
                let mut servers = Vec::new();
                if let Ok(inbox) = inbox {
                    if let Ok(Some(entry)) = router.peek(&inbox) {
                        servers.push(entry.server().to_string());
                    }
                }
                if servers.is_empty() {
                    servers.extend(fallback.iter().cloned());
                }
                let mut last_error = None;
                for server in servers {
                    let Some(addr) = router.backend(&server) else {
                        continue;
                    };
                    match BackendConn::check_password(&server, &addr, settings, user, password)
                        .await
                    {
                        Ok(answer) => return Ok(answer),
                        Err(e) => last_error = Some(format!("{server}: {e}")),
                    }
                }
                Err(CheckError::Unavailable(last_error.unwrap_or_else(|| {
                    "no backend to check the password on".into()
                })))
            }
        }
    }
}

/// One `saslauthd` request: four length-prefixed fields (login, password,
/// service, realm); the answer is one length-prefixed `OK…` or `NO…`.
async fn saslauthd(
    socket: &PathBuf,
    login: &str,
    password: &str,
    service: &str,
    realm: &str,
) -> Result<bool, CheckError> {
    let unavailable = |e: std::io::Error| {
        CheckError::Unavailable(format!("saslauthd at {}: {e}", socket.display()))
    };
    let mut request = Vec::new();
    for field in [login, password, service, realm] {
        if field.len() > SASLAUTHD_FIELD_MAX {
            // Too long to be anybody's credentials.
            return Ok(false);
        }
        request.extend_from_slice(&(field.len() as u16).to_be_bytes());
        request.extend_from_slice(field.as_bytes());
    }
    let mut conn = UnixStream::connect(socket).await.map_err(unavailable)?;
    conn.write_all(&request).await.map_err(unavailable)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).await.map_err(unavailable)?;
    let len = u16::from_be_bytes(len) as usize;
    let mut answer = vec![0u8; len.min(1024)];
    conn.read_exact(&mut answer).await.map_err(unavailable)?;
    Ok(answer.starts_with(b"OK"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stand-in speaking saslauthd's framing, to pin the byte layout; the
    /// interop tests talk to Debian's real saslauthd.
    #[tokio::test]
    async fn saslauthd_requests_are_length_prefixed_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mux");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut fields = Vec::new();
                for _ in 0..4 {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len).await.unwrap();
                    let mut f = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut f).await.unwrap();
                    fields.push(String::from_utf8(f).unwrap());
                }
                let ok = fields[1] == "right";
                let reply: &[u8] = if ok {
                    b"OK"
                } else {
                    b"NO authentication failed"
                };
                s.write_all(&(reply.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(reply).await.unwrap();
                seen.push(fields);
            }
            seen
        });
        let check = PasswordCheck::new(
            CheckMethod::Saslauthd {
                socket: path,
                service: "imap".into(),
            },
            Duration::from_secs(60),
        );
        assert!(check.check("alice@example.com", "right").await.unwrap());
        assert!(!check.check("alice", "wrong").await.unwrap());
        // A success is remembered: saslauthd is not asked again (it would
        // not answer a third connection).
        assert!(check.check("alice@example.com", "right").await.unwrap());
        assert!(!check.cache.hit("alice@example.com", "wrong"));
        let seen = server.await.unwrap();
        assert_eq!(seen[0], ["alice", "right", "imap", "example.com"]);
        assert_eq!(seen[1], ["alice", "wrong", "imap", ""]);
    }
}
