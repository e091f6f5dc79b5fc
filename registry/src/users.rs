//! Managing the replicated MUPDATE users: the requests `corvidctl user`
//! sends to a master's peer port, and the first administrator.
//!
//! Users are part of the registry state: `AddUser`, `SetUserPassword` and
//! `DeleteUser` registry commands go through Raft like mailbox writes (a
//! follower forwards them to the leader) and reach replicas on the log
//! stream and in snapshots. Only the SCRAM-SHA-256 secrets travel:
//! `corvidctl` derives them from the password on the operator's machine.
//!
//! Every request but [`UserRequest::CreateFirstAdmin`] must be
//! authenticated: by the peer's certificate when the peer port uses mutual
//! TLS, else by an administrator's user name and password
//! ([`AdminLogin`], checked like a MUPDATE PLAIN login against the node's
//! users).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::auth::{derive_credential, AuthError, CredentialStore};
use crate::model::{ClientTag, Outcome, RegistryCommand, UserCredential};
use crate::peer::PeerResponse;
use crate::raft::{Registry, RegistryError};

/// Name of the administrator created on first start or by `cluster init`.
pub const FIRST_ADMIN: &str = "admin";
/// The file in the data directory that holds the first administrator's
/// password.
pub const ADMIN_CREDENTIAL_FILE: &str = "admin-credential.txt";
/// Most users in one [`UserRequest::Import`] (one log entry).
pub const MAX_IMPORT_USERS: usize = 10_000;
/// Pause before answering a failed administrator login, as MUPDATE does,
/// so that guessing passwords is slow.
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(500);
/// How long the first administrator's write may wait for a leader.
const FIRST_ADMIN_DEADLINE: Duration = Duration::from_secs(15);

/// An administrator's user name and password, for a peer port without
/// mutual TLS.
#[derive(Clone, Serialize, Deserialize)]
pub struct AdminLogin {
    /// The administrator's user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

/// Keeps the password out of logs.
impl std::fmt::Debug for AdminLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminLogin")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What `corvidctl user` asks of a master node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum UserRequest {
    /// Add a user.
    Add {
        /// User name.
        name: String,
        /// Admin flag and secrets.
        credential: UserCredential,
    },
    /// Change a user's password (its admin flag stays).
    Passwd {
        /// User name.
        name: String,
        /// The new secrets.
        credential: UserCredential,
    },
    /// Delete a user.
    Del {
        /// User name.
        name: String,
    },
    /// The users, with their admin flags (never their secrets).
    List,
    /// Add these users (a users file), in one log entry; names the
    /// registry already holds are left as they are.
    Import(Vec<(String, UserCredential)>),
    /// Create the first administrator if neither the registry nor this
    /// node's users file holds any user: its password goes to this node's
    /// data directory, never over the network (`corvidctl cluster init`).
    CreateFirstAdmin,
}

/// The answer to a [`UserRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum UserResponse {
    /// The outcome of a write (one per user for an import).
    Outcome(Outcome),
    /// User names and whether each is an admin, in name order.
    List(Vec<(String, bool)>),
    /// Where the first administrator's password was written on the node,
    /// or `None` when there were users already.
    FirstAdmin(Option<PathBuf>),
}

/// Errors of user administration.
#[derive(Debug, Error)]
pub enum UsersError {
    /// The registry refused or could not commit.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Reading the store or writing the credential file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A credential could not be made.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// What a master needs to answer user requests.
pub struct UserAdmin {
    /// The node's users (registry, then file), to check administrator logins.
    credentials: Arc<CredentialStore>,
    /// The node's data directory (for the first administrator's password).
    data_dir: PathBuf,
    /// Administrator logins checked at once (PBKDF2 is CPU-bound): one per
    /// core, so that a flood of guesses cannot starve Raft.
    logins: tokio::sync::Semaphore,
}

impl UserAdmin {
    /// User administration for the node whose users are `credentials` and
    /// whose data directory is `data_dir`.
    pub fn new(credentials: Arc<CredentialStore>, data_dir: PathBuf) -> UserAdmin {
        UserAdmin {
            credentials,
            data_dir,
            logins: tokio::sync::Semaphore::new(crate::mupdate::server::default_parallel_auth()),
        }
    }

    /// Answers `request` from a peer; `peer_verified` says whether the
    /// peer presented a certificate of the cluster's CA (mutual TLS).
    pub async fn handle(
        &self,
        registry: &Registry,
        peer_verified: bool,
        client: ClientTag,
        login: Option<AdminLogin>,
        request: UserRequest,
    ) -> PeerResponse {
        let needs_login = !matches!(request, UserRequest::CreateFirstAdmin);
        if needs_login && !peer_verified && !self.is_admin(login).await {
            metrics::counter!("corvid_user_admin_refused_total").increment(1);
            tokio::time::sleep(FAILED_LOGIN_DELAY).await;
            return PeerResponse::Error(
                "user administration needs an administrator's login or peer mutual TLS".into(),
            );
        }
        match self.answer(registry, client, request).await {
            Ok(r) => PeerResponse::Users(r),
            Err(e) => PeerResponse::Error(e.to_string()),
        }
    }

    async fn is_admin(&self, login: Option<AdminLogin>) -> bool {
        let Some(login) = login else {
            return false;
        };
        let Ok(_slot) = self.logins.acquire().await else {
            return false;
        };
        let credentials = self.credentials.clone();
        // PBKDF2 is deliberately slow: off the async threads.
        tokio::task::spawn_blocking(move || {
            credentials
                .verify_plain(&login.user, &login.password)
                .is_some_and(|i| i.admin)
        })
        .await
        .unwrap_or(false)
    }

    async fn answer(
        &self,
        registry: &Registry,
        client: ClientTag,
        request: UserRequest,
    ) -> Result<UserResponse, UsersError> {
        let command = match request {
            UserRequest::Add { name, credential } => RegistryCommand::AddUser { name, credential },
            UserRequest::Passwd { name, credential } => {
                RegistryCommand::SetUserPassword { name, credential }
            }
            UserRequest::Del { name } => RegistryCommand::DeleteUser { name },
            UserRequest::Import(users) => {
                if users.len() > MAX_IMPORT_USERS {
                    return Err(RegistryError::Unavailable(format!(
                        "at most {MAX_IMPORT_USERS} users per import"
                    ))
                    .into());
                }
                RegistryCommand::Batch(
                    users
                        .into_iter()
                        .map(|(name, credential)| RegistryCommand::AddUser { name, credential })
                        .collect(),
                )
            }
            UserRequest::List => {
                registry.read_barrier().await?;
                let users = registry
                    .store()
                    .users()?
                    .into_iter()
                    .filter_map(|(name, u)| u.active().map(|c| (name.clone(), c.admin)))
                    .collect();
                return Ok(UserResponse::List(users));
            }
            UserRequest::CreateFirstAdmin => {
                return Ok(UserResponse::FirstAdmin(
                    create_first_admin(registry, &self.credentials, &self.data_dir).await?,
                ))
            }
        };
        Ok(UserResponse::Outcome(
            registry.write_as(client, command).await?,
        ))
    }
}

/// Creates the administrator [`FIRST_ADMIN`] with a random password in the
/// registry, unless the registry holds (or held) any user, this node's
/// users file holds one, or `data_dir` already has an
/// [`ADMIN_CREDENTIAL_FILE`] (never overwritten: it may be the only copy of
/// a password). The password is written to that file (mode 0600) before
/// the write is proposed. Returns the file's path when the administrator
/// was created.
pub async fn create_first_admin(
    registry: &Registry,
    credentials: &CredentialStore,
    data_dir: &Path,
) -> Result<Option<PathBuf>, UsersError> {
    let path = data_dir.join(ADMIN_CREDENTIAL_FILE);
    if !registry.store().users()?.is_empty() || credentials.file_has_users() || path.exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(data_dir)?;
    let password = CredentialStore::generate_password();
    let credential = derive_credential(&password, true)?;
    write_private(
        &path,
        &format!(
            "# Corvid administrator credential, created once for the registry.\n\
             # Change it with: corvidctl user passwd {FIRST_ADMIN} --password-file FILE\n\
             user = \"{FIRST_ADMIN}\"\npassword = \"{password}\"\n"
        ),
    )?;
    let command = RegistryCommand::AddUser {
        name: FIRST_ADMIN.into(),
        credential,
    };
    // One tag for every attempt: a write that landed is not applied twice.
    let client = ClientTag::once();
    let deadline = Instant::now() + FIRST_ADMIN_DEADLINE;
    loop {
        match registry.write_as(client, command.clone()).await {
            Ok(Outcome::Done) => return Ok(Some(path)),
            Ok(_) => {
                // Someone added users meanwhile: this password is not theirs.
                std::fs::remove_file(&path)?;
                return Ok(None);
            }
            // A fresh cluster may still be electing its leader. On the
            // last failure the file stays: the write may yet be applied.
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(e) => {
                tracing::debug!("first administrator not written yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes `text` to `path` with mode 0600 and syncs it.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
