//! Credentials and server-side SASL for the MUPDATE listener.
//!
//! Three layers, from the disk up:
//!
//! * [`UserFile`]: the credential file, a TOML list of users much like Cyrus's
//!   `sasldb`, except that no password is stored: only the salted SCRAM-SHA-256
//!   keys of RFC 5802 / RFC 7677 (`salt`, `iterations`, `stored_key`,
//!   `server_key`). `corvidctl user ...` edits it; saves are atomic.
//! * [`CredentialStore`]: the registry's shared, read-only view of that file.
//!   It notices when the file changes on disk (a `stat` per lookup) and
//!   re-reads it, so user changes take effect without a restart. PLAIN
//!   verifications are cached because Cyrus backends authenticate once per
//!   mailbox operation and PBKDF2 is deliberately slow.
//! * [`SaslServer`] / [`SaslExchange`]: the SASL mechanisms SCRAM-SHA-256 and
//!   PLAIN (rsasl), as a step API free of I/O.
//!
//! # Driving an exchange (MUPDATE framing, as in Cyrus's `saslserver.c`)
//!
//! ```text
//! let mut exchange = sasl.start(mechanism, plaintext_allowed)?;   // Err -> NO
//! let mut input = initial_response.map(base64_decode);            // "=" -> Some(empty)
//! loop {
//!     match exchange.step(input.as_deref()) {
//!         Ok(SaslStep::Challenge(c)) => {
//!             send(base64(c) + "\r\n");                 // bare line, empty if c is empty
//!             let line = read_line();
//!             if line == "*" { NO "Client canceled authentication"; return }
//!             input = Some(base64_decode(line)?);
//!         }
//!         Ok(SaslStep::Success { identity, final_data }) => {
//!             if let Some(d) = final_data {             // SCRAM's "v=..." message
//!                 send(base64(d) + "\r\n");             // one more challenge line
//!                 let line = read_line();               // the client answers ""
//!                 if !line.is_empty() { NO; return }    // "*" = cancel
//!             }
//!             OK "Authenticated"; remember identity; return
//!         }
//!         Err(_) => { pause; NO "authentication failed"; return }
//!     }
//! }
//! ```
//!
//! # Authorization identities
//!
//! A client may ask to act as another user (PLAIN's authzid, SCRAM's `a=`).
//! As in Cyrus's proxy policy, an empty authzid or one equal to the
//! authentication identity is always accepted; a different one only when the
//! authenticated user is an admin. The session then runs as the authzid, which
//! is an admin only if the credential file says so.
//!
//! # Character sets
//!
//! User names must be printable ASCII without spaces and passwords printable
//! ASCII: both sides of SCRAM and rsasl's PLAIN apply SASLprep, which leaves
//! exactly those strings unchanged, so the stored keys always match what a
//! client derives.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::distributions::Alphanumeric;
use rand::{Rng, RngCore};
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::prelude::{
    Mechanism, Mechname, MessageSent, Registry, SASLConfig, SASLServer, Session, SessionError,
    State,
};
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, Validation, ValidationError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::StoredUser;
use crate::store::Store;

/// PBKDF2 iterations for new passwords (RFC 7677's minimum and Cyrus's default).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Length of a generated password.
const GENERATED_PASSWORD_LEN: usize = 24;
/// Length of a fresh salt, in bytes.
const SALT_LEN: usize = 16;
/// SHA-256 output length: the size of `stored_key` and `server_key`.
const KEY_LEN: usize = crate::model::SCRAM_KEY_LEN;
/// Longest accepted password, in bytes.
const MAX_PASSWORD_LEN: usize = 1024;
/// Upper bound of the PLAIN cache; it is cleared when full (only successful
/// logins are cached, so only holders of valid passwords can fill it).
const MAX_CACHED_LOGINS: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// Errors of the credential file, the store and SASL exchanges.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credential file could not be read or written.
    #[error("credential file {path}: {source}")]
    Io {
        /// The file (or its directory) involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The credential file is not valid TOML or holds an invalid record.
    #[error("credential file {path} is invalid: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the user name where one applies.
        reason: String,
    },
    /// `add` of a user that already exists.
    #[error("user {0:?} already exists")]
    UserExists(String),
    /// The named user does not exist.
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    /// A user name outside the accepted character set or length.
    #[error("invalid user name: {0}")]
    InvalidUserName(&'static str),
    /// A password outside the accepted character set or length.
    #[error("invalid password: {0}")]
    InvalidPassword(&'static str),
    /// The client asked for a mechanism this server does not offer.
    #[error("unsupported SASL mechanism")]
    UnsupportedMechanism,
    /// PLAIN was asked for on a connection where plaintext is not allowed.
    #[error("plaintext authentication requires TLS")]
    PlaintextNotAllowed,
    /// The client's SASL data was malformed or out of sequence.
    #[error("SASL protocol error: {0}")]
    Protocol(String),
    /// Wrong credentials or a refused authorization identity.
    #[error("authentication failed: {0}")]
    Rejected(&'static str),
    /// `step` was called after the exchange succeeded or failed.
    #[error("SASL exchange already finished")]
    ExchangeFinished,
}

impl AuthError {
    fn io(path: &Path, source: io::Error) -> Self {
        AuthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn format(path: &Path, reason: impl Into<String>) -> Self {
        AuthError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// An authenticated client, as the MUPDATE session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user the session acts as (the authorization identity).
    pub user: String,
    /// Whether that user may run administrative commands.
    pub admin: bool,
}

/// One line of [`UserFile::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    /// The user name.
    pub name: String,
    /// Whether the user is an admin.
    pub admin: bool,
}

/// A user's SCRAM-SHA-256 secrets, decoded: the replicated form
/// ([`crate::model::UserCredential`]) also serves the file.
use crate::model::UserCredential as UserRecord;

/// The credential of a new password: checks the password, then derives
/// its SCRAM-SHA-256 secrets with a fresh random salt. `corvidctl user`
/// runs this on the operator's machine, so the password never travels.
pub fn derive_credential(password: &str, admin: bool) -> Result<UserRecord, AuthError> {
    check_password(password)?;
    Ok(UserRecord::new(password, admin))
}

impl UserRecord {
    /// Derives the record for `password` with a fresh random salt.
    fn new(password: &str, admin: bool) -> Self {
        let mut salt = vec![0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        let keys = ScramKeys::derive(password.as_bytes(), &salt, DEFAULT_ITERATIONS);
        UserRecord {
            admin,
            salt,
            iterations: DEFAULT_ITERATIONS,
            stored_key: keys.stored_key,
            server_key: keys.server_key,
        }
    }

    /// Runs PBKDF2 and compares the result with `stored_key` in constant time.
    fn password_matches(&self, password: &str) -> bool {
        let keys = ScramKeys::derive(password.as_bytes(), &self.salt, self.iterations);
        constant_time_eq(&keys.stored_key, &self.stored_key)
    }
}

/// SCRAM-SHA-256 keys of RFC 5802 section 3.
struct ScramKeys {
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let mut salted_password = [0u8; KEY_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted_password);
        let client_key = hmac_sha256(&salted_password, b"Client Key");
        let server_key = hmac_sha256(&salted_password, b"Server Key");
        ScramKeys {
            stored_key: Sha256::digest(client_key).into(),
            server_key,
        }
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Compares secrets without an early exit, so timing reveals no prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// User names: printable ASCII without spaces (see the module docs).
fn check_name(name: &str) -> Result<(), AuthError> {
    crate::model::check_user_name(name).map_err(AuthError::InvalidUserName)
}

/// Passwords: printable ASCII (see the module docs).
fn check_password(password: &str) -> Result<(), AuthError> {
    if password.is_empty() {
        return Err(AuthError::InvalidPassword("empty"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::InvalidPassword("longer than 1024 bytes"));
    }
    if !password.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(AuthError::InvalidPassword(
            "only printable ASCII is allowed",
        ));
    }
    Ok(())
}

/// The on-disk layout: `[[user]]` tables.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayout {
    #[serde(default, rename = "user")]
    users: Vec<UserEntry>,
}

/// One `[[user]]` table.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    #[serde(default)]
    admin: bool,
    salt: String,
    #[serde(default = "default_iterations")]
    iterations: u32,
    stored_key: String,
    server_key: String,
}

fn default_iterations() -> u32 {
    DEFAULT_ITERATIONS
}

impl UserEntry {
    fn decode(&self) -> Result<UserRecord, String> {
        let field = |what: &str, text: &str| {
            BASE64
                .decode(text)
                .map_err(|e| format!("user {:?}: {what} is not base64: {e}", self.name))
        };
        let key = |what: &str, text: &str| -> Result<[u8; KEY_LEN], String> {
            field(what, text)?
                .try_into()
                .map_err(|_| format!("user {:?}: {what} must be {KEY_LEN} bytes", self.name))
        };
        let salt = field("salt", &self.salt)?;
        if salt.is_empty() {
            return Err(format!("user {:?}: empty salt", self.name));
        }
        if self.iterations == 0 {
            return Err(format!("user {:?}: iterations must be positive", self.name));
        }
        Ok(UserRecord {
            admin: self.admin,
            salt,
            iterations: self.iterations,
            stored_key: key("stored_key", &self.stored_key)?,
            server_key: key("server_key", &self.server_key)?,
        })
    }

    fn encode(name: &str, record: &UserRecord) -> Self {
        UserEntry {
            name: name.to_owned(),
            admin: record.admin,
            salt: BASE64.encode(&record.salt),
            iterations: record.iterations,
            stored_key: BASE64.encode(record.stored_key),
            server_key: BASE64.encode(record.server_key),
        }
    }
}

/// Parses the file's text into records, rejecting anything questionable
/// (a typo in a hand-edited file should not silently drop a user).
fn parse_users(path: &Path, text: &str) -> Result<BTreeMap<String, UserRecord>, AuthError> {
    let layout: FileLayout =
        toml::from_str(text).map_err(|e| AuthError::format(path, e.to_string()))?;
    let mut users = BTreeMap::new();
    for entry in layout.users {
        check_name(&entry.name)
            .map_err(|e| AuthError::format(path, format!("user {:?}: {e}", entry.name)))?;
        let record = entry
            .decode()
            .map_err(|reason| AuthError::format(path, reason))?;
        if users.insert(entry.name.clone(), record).is_some() {
            return Err(AuthError::format(
                path,
                format!("user {:?} appears twice", entry.name),
            ));
        }
    }
    Ok(users)
}

/// The credential file, loaded for editing (`corvidctl user ...`, first start).
#[derive(Debug, Default, Clone)]
pub struct UserFile {
    users: BTreeMap<String, UserRecord>,
}

impl UserFile {
    /// Reads `path`; a missing file is an empty user list.
    pub fn load(path: impl AsRef<Path>) -> Result<UserFile, AuthError> {
        let path = path.as_ref();
        match fs::read_to_string(path) {
            Ok(text) => Ok(UserFile {
                users: parse_users(path, &text)?,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UserFile::default()),
            Err(e) => Err(AuthError::io(path, e)),
        }
    }

    /// Writes the file atomically with mode 0600: a temporary file in the same
    /// directory is written and synced, renamed over `path`, and the directory
    /// synced, so readers see the old or the new list, never half of one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), AuthError> {
        let path = path.as_ref();
        let layout = FileLayout {
            users: self
                .users
                .iter()
                .map(|(name, record)| UserEntry::encode(name, record))
                .collect(),
        };
        let body = toml::to_string(&layout).map_err(|e| AuthError::format(path, e.to_string()))?;
        let text = format!(
            "# Corvid MUPDATE credentials (SCRAM-SHA-256 keys). Edit with `corvidctl user`.\n{body}"
        );
        write_atomically(path, text.as_bytes())
    }

    /// Adds a user; fails if the name is taken.
    pub fn add(&mut self, name: &str, password: &str, admin: bool) -> Result<(), AuthError> {
        check_name(name)?;
        check_password(password)?;
        if self.users.contains_key(name) {
            return Err(AuthError::UserExists(name.to_owned()));
        }
        self.users
            .insert(name.to_owned(), UserRecord::new(password, admin));
        Ok(())
    }

    /// Replaces a user's password (with a fresh salt).
    pub fn set_password(&mut self, name: &str, password: &str) -> Result<(), AuthError> {
        check_password(password)?;
        let record = self
            .users
            .get_mut(name)
            .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?;
        *record = UserRecord::new(password, record.admin);
        Ok(())
    }

    /// Grants or revokes a user's admin right.
    pub fn set_admin(&mut self, name: &str, admin: bool) -> Result<(), AuthError> {
        let record = self
            .users
            .get_mut(name)
            .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?;
        record.admin = admin;
        Ok(())
    }

    /// Removes a user; fails if there is none of that name.
    pub fn remove(&mut self, name: &str) -> Result<(), AuthError> {
        self.users
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))
    }

    /// Every user with its credential, sorted by name (what `corvidctl user
    /// import` sends to the registry).
    pub fn credentials(&self) -> Vec<(String, UserRecord)> {
        self.users
            .iter()
            .map(|(name, record)| (name.clone(), record.clone()))
            .collect()
    }

    /// The users, sorted by name.
    pub fn list(&self) -> Vec<UserSummary> {
        self.users
            .iter()
            .map(|(name, record)| UserSummary {
                name: name.clone(),
                admin: record.admin,
            })
            .collect()
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| AuthError::format(path, "not a file path"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| AuthError::io(&dir, e))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        // The umask can only narrow the mode, but be explicit anyway.
        #[cfg(unix)]
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(AuthError::io(path, e));
    }
    // Make the rename itself durable.
    #[cfg(unix)]
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuthError::io(&dir, e))?;
    Ok(())
}

/// What identifies one version of the file on disk. Saves rename a new file
/// into place, so the inode changes even when size and mtime tick do not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino()),
            #[cfg(unix)]
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The store's mutable state, behind one mutex.
#[derive(Default)]
struct StoreState {
    /// Stamp of the file version last read; `None` before the first read or
    /// while the file is absent.
    stamp: Option<FileStamp>,
    /// Whether a read has been attempted at all.
    loaded: bool,
    users: Arc<BTreeMap<String, Arc<UserRecord>>>,
    /// Why the current file version could not be used, if it could not.
    load_error: Option<String>,
    /// Successful PLAIN logins: (user, SHA-256(salt || password)) -> the
    /// `stored_key` they were verified against. A hit only counts while the
    /// user's current record still has that key, so a password change (new
    /// salt and keys) or removal invalidates it without a PBKDF2 run.
    plain_cache: HashMap<(String, [u8; KEY_LEN]), [u8; KEY_LEN]>,
}

/// The users a node authenticates: the replicated users of its registry
/// store, then its credential file. Shared (`Arc`), thread-safe.
///
/// Which wins: the registry decides every name it holds, deleted ones
/// included ([`StoredUser::Deleted`]); the file is consulted only for
/// names the registry has never held. A file is thus a per-node bootstrap
/// source (and what `corvidctl user import` reads), and a user deleted or
/// re-keyed through the registry cannot log in with what a stale file says.
///
/// The file is re-read whenever it changes on disk. If a changed file
/// cannot be read or parsed, the store keeps the last good user list (so a
/// half-finished hand edit does not lock every backend out) and reports the
/// problem from [`CredentialStore::refresh`].
pub struct CredentialStore {
    path: PathBuf,
    /// The replicated users (none for a store over a file only).
    registry: Option<Store>,
    state: Mutex<StoreState>,
    /// Per-process secret used to fake SCRAM parameters for unknown users.
    decoy_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl CredentialStore {
    /// A store backed by the file at `path` only, read on first use. Call
    /// [`CredentialStore::refresh`] at start-up to report a broken file early.
    pub fn new(path: impl Into<PathBuf>) -> CredentialStore {
        let mut decoy_key = [0u8; KEY_LEN];
        rand::thread_rng().fill_bytes(&mut decoy_key);
        CredentialStore {
            path: path.into(),
            registry: None,
            state: Mutex::new(StoreState::default()),
            decoy_key,
        }
    }

    /// A store that looks users up in the registry `store` first, then in
    /// the file at `path` (see the type's docs for which wins).
    pub fn with_registry(path: impl Into<PathBuf>, store: Store) -> CredentialStore {
        CredentialStore {
            registry: Some(store),
            ..CredentialStore::new(path)
        }
    }

    /// The credential file's path.
    pub fn file_path(&self) -> &Path {
        &self.path
    }

    /// Whether the credential file holds at least one user.
    pub fn file_has_users(&self) -> bool {
        let mut state = self.lock();
        self.refresh_locked(&mut state);
        !state.users.is_empty()
    }

    /// A random 24-character alphanumeric password (about 143 bits), e.g. for
    /// the administrator created on first start.
    pub fn generate_password() -> String {
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(GENERATED_PASSWORD_LEN)
            .map(char::from)
            .collect()
    }

    /// Re-reads the file if it changed since the last read and says whether
    /// the current version is usable. A missing file means no users.
    pub fn refresh(&self) -> Result<(), AuthError> {
        let mut state = self.lock();
        self.refresh_locked(&mut state);
        match &state.load_error {
            Some(reason) => Err(AuthError::format(&self.path, reason.clone())),
            None => Ok(()),
        }
    }

    /// Checks a PLAIN-style user name and password. Returns the identity on
    /// success; `None` for an unknown user or a wrong password.
    ///
    /// A repeat of a successful login is answered from an in-memory cache
    /// instead of running PBKDF2 again (Cyrus backends log in once per
    /// mailbox operation).
    pub fn verify_plain(&self, user: &str, password: &str) -> Option<Identity> {
        let Some(record) = self.lookup(user) else {
            // Spend the same time as for a real user so that response
            // times do not tell which names exist.
            let decoy = self.decoy_record(user);
            let _ = decoy.password_matches(password);
            return None;
        };
        let cache_key = (user.to_owned(), plain_cache_digest(&record.salt, password));
        if let Some(verified_key) = self.lock().plain_cache.get(&cache_key) {
            if constant_time_eq(verified_key, &record.stored_key) {
                return Some(identity_of(user, &record));
            }
        }
        // PBKDF2 runs without the lock so that logins proceed in parallel.
        if !record.password_matches(password) {
            return None;
        }
        let mut state = self.lock();
        if state.plain_cache.len() >= MAX_CACHED_LOGINS {
            state.plain_cache.clear();
        }
        state.plain_cache.insert(cache_key, record.stored_key);
        Some(identity_of(user, &record))
    }

    /// The current record of `user`: the registry's if it holds the name
    /// (`None` for a deleted user), else the file's after checking it for
    /// changes.
    fn lookup(&self, user: &str) -> Option<Arc<UserRecord>> {
        if let Some(store) = &self.registry {
            match store.user(user) {
                Ok(Some(StoredUser::Active(c))) => return Some(Arc::new(c)),
                Ok(Some(StoredUser::Deleted)) => return None,
                Ok(None) => {}
                Err(e) => {
                    // Refuse rather than fall back: the file might hold a
                    // name the registry deleted.
                    tracing::warn!("reading user {user:?} from the registry: {e}");
                    return None;
                }
            }
        }
        let mut state = self.lock();
        self.refresh_locked(&mut state);
        state.users.get(user).cloned()
    }

    /// Plausible but useless SCRAM secrets for a user that does not exist,
    /// stable per name: the exchange then looks like a wrong password
    /// rather than revealing that the name is unknown.
    fn decoy_record(&self, user: &str) -> UserRecord {
        let derive = |label: &[u8]| {
            let mut mac =
                HmacSha256::new_from_slice(&self.decoy_key).expect("HMAC accepts any key length");
            mac.update(label);
            mac.update(user.as_bytes());
            <[u8; KEY_LEN]>::from(mac.finalize().into_bytes())
        };
        UserRecord {
            admin: false,
            salt: derive(b"salt\0")[..SALT_LEN].to_vec(),
            iterations: DEFAULT_ITERATIONS,
            stored_key: derive(b"stored\0"),
            server_key: derive(b"server\0"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        // The state is consistent after every statement, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_locked(&self, state: &mut StoreState) {
        let stamp = match fs::metadata(&self.path) {
            Ok(meta) => Some(FileStamp::of(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                state.load_error = Some(format!("cannot stat: {e}"));
                return;
            }
        };
        if state.loaded && stamp == state.stamp {
            return;
        }
        state.loaded = true;
        state.stamp = stamp.clone();
        // The stamp was taken before reading: if the file changes in between,
        // the next call sees a new stamp and reads again.
        let parsed = match stamp {
            None => Ok(BTreeMap::new()),
            Some(_) => match fs::read_to_string(&self.path) {
                Ok(text) => parse_users(&self.path, &text).map_err(|e| e.to_string()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
                Err(e) => Err(format!("cannot read: {e}")),
            },
        };
        match parsed {
            Ok(users) => {
                state.users = Arc::new(
                    users
                        .into_iter()
                        .map(|(name, record)| (name, Arc::new(record)))
                        .collect(),
                );
                state.load_error = None;
                // Entries of removed users would never hit again; drop them.
                let users = Arc::clone(&state.users);
                state.plain_cache.retain(|(name, _), key| {
                    users
                        .get(name)
                        .is_some_and(|r| constant_time_eq(&r.stored_key, key))
                });
            }
            Err(reason) => state.load_error = Some(reason),
        }
    }
}

fn plain_cache_digest(salt: &[u8], password: &str) -> [u8; KEY_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

fn identity_of(user: &str, record: &UserRecord) -> Identity {
    Identity {
        user: user.to_owned(),
        admin: record.admin,
    }
}

/// The mechanisms offered, strongest first.
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const PLAIN: &str = "PLAIN";

/// Only these two; notably no `-PLUS` variant, so a client that could do
/// channel binding but sees none offered (SCRAM flag `y`) is accepted.
static MECHANISMS: [Mechanism; 2] = [
    rsasl::mechanisms::scram::SCRAM_SHA256,
    rsasl::mechanisms::plain::PLAIN,
];

/// What the rsasl callback hands back to the exchange once credentials check out.
struct Verdict;

impl Validation for Verdict {
    type Value = Result<Identity, &'static str>;
}

/// Connects rsasl's callbacks to the credential store.
struct StoreCallback {
    store: Arc<CredentialStore>,
}

impl StoreCallback {
    /// Applies the authorization policy described in the module docs.
    fn authorize(
        &self,
        identity: Identity,
        authzid: Option<&str>,
    ) -> Result<Identity, &'static str> {
        match authzid {
            None | Some("") => Ok(identity),
            Some(requested) if requested == identity.user => Ok(identity),
            Some(requested) if identity.admin => {
                check_name(requested).map_err(|_| "invalid authorization identity")?;
                let admin = self.store.lookup(requested).is_some_and(|r| r.admin);
                Ok(Identity {
                    user: requested.to_owned(),
                    admin,
                })
            }
            Some(_) => Err("not authorized to act as another user"),
        }
    }

    fn plain_verdict(&self, context: &Context) -> Result<Identity, &'static str> {
        let user = context.get_ref::<AuthId>().ok_or("no user name")?;
        let password = context.get_ref::<Password>().ok_or("no password")?;
        let password = std::str::from_utf8(password).map_err(|_| "invalid credentials")?;
        let identity = self
            .store
            .verify_plain(user, password)
            .ok_or("invalid credentials")?;
        self.authorize(identity, context.get_ref::<AuthzId>())
    }

    /// Called by rsasl only after the client proof matched `stored_key`.
    fn scram_verdict(&self, context: &Context) -> Result<Identity, &'static str> {
        let user = context
            .get_ref::<AuthId>()
            .and_then(scram_unescape)
            .ok_or("invalid user name")?;
        // Looked up again: the user may have been removed meanwhile.
        let record = self.store.lookup(&user).ok_or("invalid credentials")?;
        let authzid = match context.get_ref::<AuthzId>() {
            Some(raw) => Some(scram_unescape(raw).ok_or("invalid authorization identity")?),
            None => None,
        };
        self.authorize(identity_of(&user, &record), authzid.as_deref())
    }
}

impl SessionCallback for StoreCallback {
    fn callback(
        &self,
        _session_data: &SessionData,
        context: &Context,
        request: &mut Request<'_>,
    ) -> Result<(), SessionError> {
        if request.is::<ScramStoredPassword>() {
            if let Some(user) = context.get_ref::<AuthId>().and_then(scram_unescape) {
                let record = match self.store.lookup(&user) {
                    Some(record) => record,
                    None => Arc::new(self.store.decoy_record(&user)),
                };
                request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
                    record.iterations,
                    &record.salt,
                    &record.stored_key,
                    &record.server_key,
                ))?;
            }
        }
        Ok(())
    }

    fn validate(
        &self,
        session_data: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let verdict = match session_data.mechanism().mechanism.as_str() {
            PLAIN => self.plain_verdict(context),
            SCRAM_SHA_256 => self.scram_verdict(context),
            _ => Err("unsupported mechanism"),
        };
        validate.with::<Verdict, _>(|| Ok(verdict))?;
        Ok(())
    }
}

/// SCRAM escapes `,` and `=` in names as `=2C` and `=3D` (RFC 5802 5.1).
fn scram_unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('=') {
        out.push_str(&rest[..pos]);
        let escape = rest.get(pos..pos + 3)?;
        out.push(match escape {
            "=2C" => ',',
            "=3D" => '=',
            _ => return None,
        });
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// rsasl 2.3's SCRAM parser slices attributes without checking their length
/// and would panic on e.g. `n,a,...`; reject such messages first. RFC 5802
/// attributes are always `x=...`, so this refuses nothing valid.
fn scram_message_well_formed(client_first: bool, message: &[u8]) -> bool {
    let mut parts = message.split(|b| *b == b',');
    if client_first {
        let _cbind_flag = parts.next();
        match parts.next() {
            Some(authzid) if authzid.is_empty() || authzid.starts_with(b"a=") => {}
            _ => return false,
        }
    }
    let mut count = 0;
    for part in parts {
        if part.len() < 2 || part[1] != b'=' {
            return false;
        }
        count += 1;
    }
    count >= 2
}

/// SASL for the MUPDATE listener: SCRAM-SHA-256 and PLAIN against a
/// [`CredentialStore`]. Cheap to share; each AUTHENTICATE gets a
/// [`SaslExchange`] from [`SaslServer::start`].
#[derive(Clone)]
pub struct SaslServer {
    config: Arc<SASLConfig>,
}

impl std::fmt::Debug for SaslServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslServer").finish_non_exhaustive()
    }
}

impl SaslServer {
    /// A SASL server checking credentials against `store`.
    pub fn new(store: Arc<CredentialStore>) -> SaslServer {
        let config = SASLConfig::builder()
            .with_registry(Registry::with_mechanisms(&MECHANISMS))
            .with_callback(StoreCallback { store })
            // rsasl 2.x's builder has no failure path; only its signature is fallible.
            .expect("rsasl configuration cannot fail");
        SaslServer { config }
    }

    /// The mechanisms to advertise in the `* AUTH` banner, strongest first.
    /// PLAIN is only offered where plaintext passwords are allowed (TLS
    /// active, or explicitly configured).
    pub fn mechanisms(&self, plaintext_allowed: bool) -> Vec<&'static str> {
        if plaintext_allowed {
            vec![SCRAM_SHA_256, PLAIN]
        } else {
            vec![SCRAM_SHA_256]
        }
    }

    /// Starts an exchange for the client's `mechanism` (case-insensitive).
    /// Fails for mechanisms not offered under `plaintext_allowed`.
    pub fn start(
        &self,
        mechanism: &str,
        plaintext_allowed: bool,
    ) -> Result<SaslExchange, AuthError> {
        let name = if mechanism.eq_ignore_ascii_case(SCRAM_SHA_256) {
            SCRAM_SHA_256
        } else if mechanism.eq_ignore_ascii_case(PLAIN) {
            if !plaintext_allowed {
                return Err(AuthError::PlaintextNotAllowed);
            }
            PLAIN
        } else {
            return Err(AuthError::UnsupportedMechanism);
        };
        let mechname =
            Mechname::parse(name.as_bytes()).map_err(|_| AuthError::UnsupportedMechanism)?;
        let session = SASLServer::<Verdict>::new(Arc::clone(&self.config))
            .start_suggested(mechname)
            .map_err(|_| AuthError::UnsupportedMechanism)?;
        Ok(SaslExchange {
            session,
            scram: name == SCRAM_SHA_256,
            messages: 0,
            prompted: false,
            finished: false,
        })
    }
}

/// One step's outcome of a [`SaslExchange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslStep {
    /// Send this to the client (base64, as a bare line; empty data is an
    /// empty line) and feed its answer to the next [`SaslExchange::step`].
    Challenge(Vec<u8>),
    /// The client is authenticated.
    Success {
        /// Who the session now acts as.
        identity: Identity,
        /// Server data for the client (SCRAM's `v=` verifier). MUPDATE sends it
        /// as one more challenge line; the client answers with an empty line
        /// and only then gets `OK`. `None` for PLAIN: answer `OK` at once.
        final_data: Option<Vec<u8>>,
    },
}

/// One AUTHENTICATE exchange on the server side. Not reusable: after a
/// success or any error, further steps fail with [`AuthError::ExchangeFinished`].
pub struct SaslExchange {
    session: Session<Verdict>,
    scram: bool,
    /// Client messages passed to the mechanism so far.
    messages: u32,
    /// Whether an empty challenge already asked for the first message.
    prompted: bool,
    finished: bool,
}

impl std::fmt::Debug for SaslExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslExchange")
            .field("mechanism", &self.session.get_mechname().as_str())
            .field("messages", &self.messages)
            .field("finished", &self.finished)
            .finish()
    }
}

impl SaslExchange {
    /// The mechanism in use, in canonical spelling.
    pub fn mechanism(&self) -> &str {
        self.session.get_mechname().as_str()
    }

    /// Advances the exchange.
    ///
    /// `input`: decoded client data (None when the client sent no initial
    /// response). Both mechanisms are client-first, so `None` on the first
    /// step yields an empty challenge asking for the client's first message;
    /// an initial response of `=` is `Some(&[])`, not `None`.
    pub fn step(&mut self, input: Option<&[u8]>) -> Result<SaslStep, AuthError> {
        if self.finished {
            return Err(AuthError::ExchangeFinished);
        }
        let result = self.advance(input);
        if !matches!(result, Ok(SaslStep::Challenge(_))) {
            self.finished = true;
        }
        result
    }

    fn advance(&mut self, input: Option<&[u8]>) -> Result<SaslStep, AuthError> {
        let Some(input) = input else {
            if self.messages == 0 && !self.prompted {
                self.prompted = true;
                return Ok(SaslStep::Challenge(Vec::new()));
            }
            return Err(AuthError::Protocol("client response missing".into()));
        };
        if self.scram && !scram_message_well_formed(self.messages == 0, input) {
            return Err(AuthError::Protocol("malformed SCRAM message".into()));
        }
        self.messages += 1;
        let mut output = Vec::new();
        // Belt and braces against panics inside the mechanism on hostile input
        // (the exchange is discarded afterwards, so no broken state survives).
        let state = catch_unwind(AssertUnwindSafe(|| {
            self.session.step(Some(input), &mut output)
        }))
        .map_err(|_| AuthError::Protocol("mechanism failed on client data".into()))?
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
        match state {
            State::Running => Ok(SaslStep::Challenge(output)),
            State::Finished(sent) => match self.session.validation() {
                Some(Ok(identity)) => Ok(SaslStep::Success {
                    identity,
                    final_data: (sent == MessageSent::Yes).then_some(output),
                }),
                Some(Err(reason)) => Err(AuthError::Rejected(reason)),
                // SCRAM's proof did not match: rsasl wrote an `e=` message
                // but never asked for validation.
                None => Err(AuthError::Rejected("invalid credentials")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsasl::prelude::SASLClient;

    fn store_with(
        users: &[(&str, &str, bool)],
    ) -> (tempfile::TempDir, PathBuf, Arc<CredentialStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users.toml");
        let mut file = UserFile::default();
        for (name, password, admin) in users {
            file.add(name, password, *admin).expect("add");
        }
        file.save(&path).expect("save");
        let store = Arc::new(CredentialStore::new(&path));
        (dir, path, store)
    }

    /// Runs a whole exchange with rsasl's client, framing it as MUPDATE does
    /// (no initial response, so the server's empty challenge comes first).
    fn run_exchange(
        server: &SaslServer,
        mechanism: &str,
        authzid: Option<&str>,
        user: &str,
        password: &str,
    ) -> Result<Identity, AuthError> {
        let config = SASLConfig::with_credentials(
            authzid.map(str::to_owned),
            user.to_owned(),
            password.to_owned(),
        )
        .expect("client config");
        let mechname = Mechname::parse(mechanism.as_bytes()).expect("mechname");
        let mut client = SASLClient::new(config)
            .start_suggested(&[mechname])
            .expect("client session");
        assert_eq!(client.get_mechname().as_str(), mechanism);
        let mut exchange = server.start(mechanism, true)?;
        let mut input: Option<Vec<u8>> = None;
        for _ in 0..5 {
            match exchange.step(input.as_deref())? {
                SaslStep::Challenge(challenge) => {
                    let mut answer = Vec::new();
                    client
                        .step(Some(&challenge), &mut answer)
                        .expect("client step");
                    input = Some(answer);
                }
                SaslStep::Success {
                    identity,
                    final_data,
                } => {
                    if mechanism == SCRAM_SHA_256 {
                        let data = final_data.expect("SCRAM sends a verifier");
                        assert!(data.starts_with(b"v="));
                        // The client checks the server signature here.
                        let mut answer = Vec::new();
                        let state = client.step(Some(&data), &mut answer).expect("verifier");
                        assert!(state.is_finished());
                        assert!(
                            answer.is_empty(),
                            "client answers the verifier with nothing"
                        );
                    } else {
                        assert_eq!(final_data, None);
                    }
                    assert_eq!(exchange.step(Some(b"")), Err(AuthError::ExchangeFinished));
                    return Ok(identity);
                }
            }
        }
        panic!("exchange did not finish");
    }

    impl PartialEq for AuthError {
        fn eq(&self, other: &Self) -> bool {
            self.to_string() == other.to_string()
        }
    }

    #[test]
    fn user_file_round_trips_and_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("users.toml");
        assert!(UserFile::load(&path)
            .expect("missing file")
            .list()
            .is_empty());

        let mut file = UserFile::default();
        file.add("mupdate", "secret one", true).expect("add");
        file.add("backend", "secret-two", false).expect("add");
        assert!(matches!(
            file.add("backend", "x", false),
            Err(AuthError::UserExists(_))
        ));
        file.save(&path).expect("save");

        let loaded = UserFile::load(&path).expect("load");
        assert_eq!(
            loaded.list(),
            vec![
                UserSummary {
                    name: "backend".into(),
                    admin: false
                },
                UserSummary {
                    name: "mupdate".into(),
                    admin: true
                },
            ]
        );
        assert_eq!(loaded.users, file.users, "keys survive the round trip");
        let record = &loaded.users["mupdate"];
        assert_eq!(record.iterations, DEFAULT_ITERATIONS);
        assert_eq!(record.salt.len(), SALT_LEN);
        assert!(record.password_matches("secret one"));
        assert!(!record.password_matches("secret two"));
        assert_ne!(
            record.salt, loaded.users["backend"].salt,
            "salts are random"
        );

        let mut edited = loaded;
        edited.set_admin("backend", true).expect("set_admin");
        edited
            .set_password("mupdate", "new password")
            .expect("set_password");
        edited.remove("backend").expect("remove");
        assert!(matches!(
            edited.remove("backend"),
            Err(AuthError::NoSuchUser(_))
        ));
        assert!(matches!(
            edited.set_password("nobody", "pw"),
            Err(AuthError::NoSuchUser(_))
        ));
        assert!(matches!(
            edited.set_admin("nobody", true),
            Err(AuthError::NoSuchUser(_))
        ));
        edited.save(&path).expect("save again");
        let reloaded = UserFile::load(&path).expect("reload");
        assert_eq!(
            reloaded.list(),
            vec![UserSummary {
                name: "mupdate".into(),
                admin: true
            }]
        );
        assert!(reloaded.users["mupdate"].password_matches("new password"));
        assert!(!reloaded.users["mupdate"].password_matches("secret one"));
    }

    #[test]
    fn user_file_rejects_bad_names_passwords_and_records() {
        let mut file = UserFile::default();
        assert!(matches!(
            file.add("", "pw", false),
            Err(AuthError::InvalidUserName(_))
        ));
        assert!(matches!(
            file.add("a b", "pw", false),
            Err(AuthError::InvalidUserName(_))
        ));
        assert!(matches!(
            file.add("é", "pw", false),
            Err(AuthError::InvalidUserName(_))
        ));
        assert!(matches!(
            file.add("a", "", false),
            Err(AuthError::InvalidPassword(_))
        ));
        assert!(matches!(
            file.add("a", "pä", false),
            Err(AuthError::InvalidPassword(_))
        ));
        assert!(matches!(
            file.add("a", "p\n", false),
            Err(AuthError::InvalidPassword(_))
        ));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users.toml");
        let key = BASE64.encode([7u8; 32]);
        let good = format!(
            "[[user]]\nname = \"u\"\nsalt = \"c2FsdA==\"\nstored_key = \"{key}\"\nserver_key = \"{key}\"\n"
        );
        fs::write(&path, &good).expect("write");
        let file = UserFile::load(&path).expect("iterations and admin default");
        assert_eq!(file.users["u"].iterations, 4096);
        assert!(!file.users["u"].admin);

        for bad in [
            good.replace("stored_key = \"", "stored_key = \"AAAA"),
            good.replace("c2FsdA==", "not base64!"),
            good.replace("name = \"u\"", "name = \"u\"\nadmn = true"),
            format!("{good}{good}"),
            good.replace("name = \"u\"", "name = \"u\"\niterations = 0"),
            "[[user]\n".to_string(),
        ] {
            fs::write(&path, &bad).expect("write");
            assert!(
                matches!(UserFile::load(&path), Err(AuthError::Format { .. })),
                "accepted: {bad}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn save_is_atomic_and_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users.toml");
        fs::write(&path, "# old\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let old_inode = fs::metadata(&path).expect("stat").ino();

        let mut file = UserFile::default();
        file.add("u", "pw", false).expect("add");
        file.save(&path).expect("save");

        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_ne!(
            meta.ino(),
            old_inode,
            "replaced by rename, not rewritten in place"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("users.toml")],
            "no temp file left"
        );

        // A failed save leaves the old file intact: the target is a directory.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).expect("mkdir");
        fs::write(blocked.join("x"), "x").expect("write");
        assert!(matches!(file.save(&blocked), Err(AuthError::Io { .. })));
        assert!(blocked.join("x").exists());
        assert_eq!(fs::read_dir(dir.path()).expect("readdir").count(), 2);
    }

    #[test]
    fn verify_plain_checks_passwords() {
        let (_dir, _path, store) =
            store_with(&[("admin", "adminpw", true), ("be1", "be1pw", false)]);
        assert_eq!(
            store.verify_plain("admin", "adminpw"),
            Some(Identity {
                user: "admin".into(),
                admin: true
            })
        );
        assert_eq!(
            store.verify_plain("be1", "be1pw"),
            Some(Identity {
                user: "be1".into(),
                admin: false
            })
        );
        assert_eq!(store.verify_plain("be1", "adminpw"), None);
        assert_eq!(store.verify_plain("be1", ""), None);
        assert_eq!(store.verify_plain("nobody", "be1pw"), None);
        // Cached success does not leak to other passwords or users.
        assert_eq!(
            store.verify_plain("be1", "be1pw").map(|i| i.user),
            Some("be1".into())
        );
        assert_eq!(store.verify_plain("be1", "be1pw "), None);
        assert_eq!(store.verify_plain("admin", "be1pw"), None);
        store.refresh().expect("file is fine");
    }

    #[test]
    fn verify_plain_follows_file_changes() {
        let (_dir, path, store) = store_with(&[("be1", "old", false)]);
        assert!(store.verify_plain("be1", "old").is_some()); // now cached

        // Password change on disk: the cached success must not survive it.
        let mut file = UserFile::load(&path).expect("load");
        file.set_password("be1", "new").expect("set_password");
        file.add("be2", "pw2", false).expect("add");
        file.save(&path).expect("save");
        assert_eq!(store.verify_plain("be1", "old"), None);
        assert!(store.verify_plain("be1", "new").is_some());
        assert!(
            store.verify_plain("be2", "pw2").is_some(),
            "new user without restart"
        );

        // Admin flag change is seen even on a cache hit.
        let mut file = UserFile::load(&path).expect("load");
        file.set_admin("be1", true).expect("set_admin");
        file.save(&path).expect("save");
        assert_eq!(
            store.verify_plain("be1", "new").map(|i| i.admin),
            Some(true)
        );

        // Removal.
        let mut file = UserFile::load(&path).expect("load");
        file.remove("be1").expect("remove");
        file.save(&path).expect("save");
        assert_eq!(store.verify_plain("be1", "new"), None);

        // A broken file keeps the last good users and is reported.
        fs::write(&path, "this is not toml [").expect("write");
        assert!(matches!(store.refresh(), Err(AuthError::Format { .. })));
        assert!(store.verify_plain("be2", "pw2").is_some());

        // Deleting the file removes every user.
        fs::remove_file(&path).expect("rm");
        assert_eq!(store.verify_plain("be2", "pw2"), None);
        store.refresh().expect("missing file is an empty list");
    }

    #[test]
    fn the_registry_wins_over_the_file_deletions_included() {
        let (dir, path, _) = store_with(&[
            ("be1", "file-pw", false),
            ("reader", "reader-pw", false),
            ("admin", "adminpw", true),
        ]);
        let registry = Store::open(&dir.path().join("registry")).expect("open store");
        registry.begin_reset().expect("reset");
        registry
            .put_entries(&[
                crate::store::StateItem::User(
                    "be1".into(),
                    StoredUser::Active(derive_credential("registry-pw", true).unwrap()),
                ),
                crate::store::StateItem::User("reader".into(), StoredUser::Deleted),
            ])
            .expect("put");
        registry.finish_reset(None).expect("swap");
        let store = Arc::new(CredentialStore::with_registry(&path, registry));
        assert_eq!(
            store.verify_plain("be1", "registry-pw"),
            Some(Identity {
                user: "be1".into(),
                admin: true
            })
        );
        assert_eq!(store.verify_plain("be1", "file-pw"), None);
        assert_eq!(store.verify_plain("reader", "reader-pw"), None);
        // Names the registry never held come from the file.
        assert!(store
            .verify_plain("admin", "adminpw")
            .is_some_and(|i| i.admin));
        assert!(store.file_has_users());
        let server = SaslServer::new(store);
        assert!(run_exchange(&server, SCRAM_SHA_256, None, "be1", "registry-pw").is_ok());
        assert!(run_exchange(&server, SCRAM_SHA_256, None, "be1", "file-pw").is_err());
        assert!(run_exchange(&server, SCRAM_SHA_256, None, "reader", "reader-pw").is_err());
    }

    #[test]
    fn cache_hit_skips_pbkdf2() {
        let (_dir, _path, store) = store_with(&[("be1", "pw", false)]);
        assert!(store.verify_plain("be1", "pw").is_some());
        // Swap in a record whose keys no longer match "pw" but keep the cache
        // entry's stored_key: only the cache can make the login succeed, which
        // proves the second check skipped PBKDF2.
        let mut state = store.lock();
        let mut record = (*state.users["be1"]).clone();
        record.iterations = 1;
        Arc::make_mut(&mut state.users).insert("be1".into(), Arc::new(record));
        drop(state);
        assert!(store.verify_plain("be1", "pw").is_some());
        assert!(store.verify_plain("be1", "other").is_none());
    }

    #[test]
    fn generated_passwords_are_random_alphanumeric() {
        let a = CredentialStore::generate_password();
        let b = CredentialStore::generate_password();
        assert_eq!(a.len(), 24);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert!(check_password(&a).is_ok());
    }

    /// RFC 7677 section 3: the keys derived for "pencil" must reproduce the
    /// example's client proof and server signature.
    #[test]
    fn scram_keys_match_rfc7677_example() {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let keys = ScramKeys::derive(b"pencil", &salt, 4096);
        // The client side, computed independently of ScramKeys.
        let mut salted_password = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"pencil", &salt, 4096, &mut salted_password);
        let client_key = hmac_sha256(&salted_password, b"Client Key");
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(client_key)),
            keys.stored_key
        );
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let client_signature = hmac_sha256(&keys.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        assert_eq!(
            BASE64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_signature = hmac_sha256(&keys.server_key, auth_message.as_bytes());
        assert_eq!(
            BASE64.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn scram_exchange_with_rsasl_client() {
        let (_dir, _path, store) = store_with(&[("mupdate", "s3cret", true), ("be1", "pw", false)]);
        let server = SaslServer::new(store);
        assert_eq!(
            run_exchange(&server, SCRAM_SHA_256, None, "mupdate", "s3cret").expect("login"),
            Identity {
                user: "mupdate".into(),
                admin: true
            }
        );
        assert_eq!(
            run_exchange(&server, SCRAM_SHA_256, None, "be1", "pw").expect("login"),
            Identity {
                user: "be1".into(),
                admin: false
            }
        );
        assert_eq!(
            run_exchange(&server, SCRAM_SHA_256, None, "be1", "wrong"),
            Err(AuthError::Rejected("invalid credentials"))
        );
        assert_eq!(
            run_exchange(&server, SCRAM_SHA_256, None, "nobody", "pw"),
            Err(AuthError::Rejected("invalid credentials"))
        );
    }

    #[test]
    fn scram_unknown_user_looks_like_a_known_one() {
        let (_dir, _path, store) = store_with(&[("be1", "pw", false)]);
        let server = SaslServer::new(store);
        let first_reply = |user: &str| {
            let mut exchange = server.start("scram-sha-256", false).expect("start");
            let first = format!("n,,n={user},r=abcdefghijklmnop");
            match exchange.step(Some(first.as_bytes())).expect("step") {
                SaslStep::Challenge(c) => String::from_utf8(c).expect("utf8"),
                other => panic!("unexpected {other:?}"),
            }
        };
        let known = first_reply("be1");
        let unknown = first_reply("nobody");
        assert!(known.ends_with(",i=4096"), "{known}");
        assert!(unknown.ends_with(",i=4096"), "{unknown}");
        let salt = |reply: &str| reply.split(",s=").nth(1).map(|s| s.len());
        assert_eq!(salt(&known), salt(&unknown));
        // Same name, same decoy salt: repeated probes do not stand out either.
        assert_eq!(
            first_reply("nobody").split(',').nth(1),
            unknown.split(',').nth(1)
        );
    }

    #[test]
    fn plain_exchange_with_rsasl_client() {
        let (_dir, _path, store) = store_with(&[("mupdate", "s3cret", true), ("be1", "pw", false)]);
        let server = SaslServer::new(store);
        assert_eq!(
            run_exchange(&server, PLAIN, None, "be1", "pw").expect("login"),
            Identity {
                user: "be1".into(),
                admin: false
            }
        );
        assert_eq!(
            run_exchange(&server, PLAIN, None, "be1", "wrong"),
            Err(AuthError::Rejected("invalid credentials"))
        );
        assert_eq!(
            run_exchange(&server, PLAIN, None, "nobody", "pw"),
            Err(AuthError::Rejected("invalid credentials"))
        );
    }

    #[test]
    fn authorization_identity_policy() {
        let (_dir, _path, store) = store_with(&[
            ("mupdate", "s3cret", true),
            ("other-admin", "x", true),
            ("be1", "pw", false),
        ]);
        let server = SaslServer::new(store);
        for mech in [PLAIN, SCRAM_SHA_256] {
            // Same as the authentication identity: fine.
            assert_eq!(
                run_exchange(&server, mech, Some("be1"), "be1", "pw").map(|i| i.user),
                Ok("be1".to_string())
            );
            // Non-admins may not act as someone else.
            assert_eq!(
                run_exchange(&server, mech, Some("mupdate"), "be1", "pw"),
                Err(AuthError::Rejected("not authorized to act as another user"))
            );
            // Admins may, and get the target's rights.
            assert_eq!(
                run_exchange(&server, mech, Some("be1"), "mupdate", "s3cret"),
                Ok(Identity {
                    user: "be1".into(),
                    admin: false
                })
            );
            assert_eq!(
                run_exchange(&server, mech, Some("other-admin"), "mupdate", "s3cret"),
                Ok(Identity {
                    user: "other-admin".into(),
                    admin: true
                })
            );
            assert_eq!(
                run_exchange(&server, mech, Some("cyrus"), "mupdate", "s3cret"),
                Ok(Identity {
                    user: "cyrus".into(),
                    admin: false
                })
            );
        }
    }

    #[test]
    fn plain_with_initial_response_and_mechanism_rules() {
        let (_dir, _path, store) = store_with(&[("be1", "pw", false)]);
        let server = SaslServer::new(store);
        assert_eq!(server.mechanisms(true), vec!["SCRAM-SHA-256", "PLAIN"]);
        assert_eq!(server.mechanisms(false), vec!["SCRAM-SHA-256"]);
        assert!(matches!(
            server.start("PLAIN", false),
            Err(AuthError::PlaintextNotAllowed)
        ));
        assert!(matches!(
            server.start("LOGIN", true),
            Err(AuthError::UnsupportedMechanism)
        ));
        assert!(matches!(
            server.start("SCRAM-SHA-256-PLUS", true),
            Err(AuthError::UnsupportedMechanism)
        ));

        let mut exchange = server.start("plain", true).expect("case-insensitive");
        assert_eq!(exchange.mechanism(), "PLAIN");
        match exchange.step(Some(b"\0be1\0pw")).expect("login") {
            SaslStep::Success {
                identity,
                final_data,
            } => {
                assert_eq!(identity.user, "be1");
                assert_eq!(final_data, None);
            }
            other => panic!("unexpected {other:?}"),
        }

        // An empty initial response ("=") is data, not a request for a challenge.
        let mut exchange = server.start("PLAIN", true).expect("start");
        assert!(matches!(
            exchange.step(Some(b"")),
            Err(AuthError::Protocol(_))
        ));
        assert_eq!(
            exchange.step(Some(b"\0be1\0pw")),
            Err(AuthError::ExchangeFinished)
        );

        // Only one empty challenge is handed out.
        let mut exchange = server.start("PLAIN", true).expect("start");
        assert_eq!(exchange.step(None), Ok(SaslStep::Challenge(Vec::new())));
        assert!(matches!(exchange.step(None), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn malformed_scram_messages_fail_cleanly() {
        let (_dir, _path, store) = store_with(&[("be1", "pw", false)]);
        let server = SaslServer::new(store);
        for first in [
            &b""[..],
            b"n",
            b"n,a,n=be1,r=abc",
            b"n,,x",
            b"n,,n=be1",
            b"n,,n=be1,r",
            b"p=tls-unique,,n=be1,r=abc",
            b"\xff\xfe",
        ] {
            let mut exchange = server.start(SCRAM_SHA_256, false).expect("start");
            assert!(
                matches!(exchange.step(Some(first)), Err(AuthError::Protocol(_))),
                "accepted {first:?}"
            );
        }
        for last in [
            &b""[..],
            b"c",
            b"c=biws",
            b"c=biws,r=x,p",
            b"c=biws,r=x,,p=abc",
        ] {
            let mut exchange = server.start(SCRAM_SHA_256, false).expect("start");
            assert!(matches!(
                exchange.step(Some(b"n,,n=be1,r=abcdefgh")),
                Ok(SaslStep::Challenge(_))
            ));
            assert!(
                matches!(
                    exchange.step(Some(last)),
                    Err(AuthError::Protocol(_) | AuthError::Rejected(_))
                ),
                "accepted {last:?}"
            );
        }
        // The 'y' flag (client could bind, server offers no -PLUS) is accepted.
        let mut exchange = server.start(SCRAM_SHA_256, false).expect("start");
        assert!(matches!(
            exchange.step(Some(b"y,,n=be1,r=abcdefgh")),
            Ok(SaslStep::Challenge(_))
        ));
    }

    /// Inputs that make rsasl 2.3's parser panic must be stopped before it.
    #[test]
    fn scram_precheck_stops_parser_panics() {
        for first in [&b"n,a,n=x,r=y"[..], b"n,,x", b"n,,n=x,r", b"n,,n=x", b"n"] {
            assert!(!scram_message_well_formed(true, first), "{first:?}");
        }
        for last in [&b"c"[..], b"c=biws,r", b"c=biws,r=x,p", b"c=biws,r=x,,p=y"] {
            assert!(!scram_message_well_formed(false, last), "{last:?}");
        }
        assert!(scram_message_well_formed(true, b"n,,n=x,r=y"));
        assert!(scram_message_well_formed(true, b"y,a=z,n=x,r=y,e=ext"));
        assert!(scram_message_well_formed(false, b"c=biws,r=xy,p=abc="));
    }

    #[test]
    fn scram_names_are_unescaped() {
        assert_eq!(scram_unescape("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(scram_unescape("plain").as_deref(), Some("plain"));
        assert_eq!(scram_unescape("bad=2"), None);
        assert_eq!(scram_unescape("bad=41"), None);

        let (_dir, _path, store) = store_with(&[("a,b=c", "pw", false)]);
        let server = SaslServer::new(store);
        assert_eq!(
            run_exchange(&server, SCRAM_SHA_256, None, "a,b=c", "pw").map(|i| i.user),
            Ok("a,b=c".to_string())
        );
    }

    #[test]
    fn exchange_is_send_and_store_is_shareable() {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<SaslExchange>();
        assert_send_sync::<SaslServer>();
        assert_send_sync::<CredentialStore>();
    }
}
