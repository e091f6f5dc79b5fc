//! The registry's data model and its one apply function.
//!
//! A mailbox entry says which backend (`server!partition`) holds a mailbox,
//! with what ACL, and whether it is merely reserved or active. Registry
//! commands are the entries of the Raft log; [`apply`] checks and changes the
//! state in log order, so a check ("already exists", "reserved elsewhere") and
//! the change it guards are one step and the result is linearizable.
//!
//! Semantics follow Cyrus 3.6's MUPDATE master, except where Cyrus crashes
//! (DELETE of an unknown name, DEACTIVATE of a reservation or an unknown
//! name): there Corvid answers `NO` with the texts of newer Cyrus versions.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a mailbox is only reserved (being created or moved) or active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxState {
    /// Reserved by a backend; not yet usable by frontends.
    Reserved,
    /// Active on its backend.
    Active,
}

/// One mailbox as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxEntry {
    /// Cyrus internal name, e.g. `user.alice` or `example.com!user.alice`.
    pub name: String,
    /// `server!partition`, split at the first `!`.
    pub location: String,
    /// ACL as Cyrus sends it: `identifier TAB rights TAB`, repeated.
    pub acl: String,
    /// Reserved or active.
    pub state: MailboxState,
    /// Log index of the entry's last change.
    pub last_change: u64,
}

impl MailboxEntry {
    /// The server part of the location (before the first `!`).
    pub fn server(&self) -> &str {
        server_of(&self.location)
    }
}

/// The server part of a `server!partition` location.
pub fn server_of(location: &str) -> &str {
    location.split_once('!').map_or(location, |(s, _)| s)
}

/// Cyrus's mailbox order: byte order, except that the hierarchy separator
/// `.` sorts before every other character (so `user.a.b` comes before
/// `user.a-b`). `ctl_mboxlist -m` walks LIST beside its own mailboxes.db in
/// this order and aborts ("mupdate said not us before it said us") when a
/// master lists in plain byte order.
pub fn cyrus_mailbox_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn rank(c: u8) -> u8 {
        match c {
            0 => 0,
            b'\t' | b'\n' => 1,
            b'.' => 2,
            1..=8 => c + 2,
            c => c,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    for (x, y) in a.iter().zip(b) {
        match rank(*x).cmp(&rank(*y)) {
            std::cmp::Ordering::Equal => {}
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

/// Longest accepted user name, in bytes.
pub const MAX_USER_NAME_LEN: usize = 256;
/// Longest accepted SCRAM salt, in bytes.
pub const MAX_SALT_LEN: usize = 256;
/// Most PBKDF2 iterations accepted for a stored credential: more would let
/// one record cost every login on every node seconds of CPU.
pub const MAX_ITERATIONS: u32 = 1 << 20;
/// Size of `stored_key` and `server_key` (SHA-256).
pub const SCRAM_KEY_LEN: usize = 32;

/// Checks a user name: non-empty, at most [`MAX_USER_NAME_LEN`] bytes,
/// printable ASCII without spaces (SASLprep leaves exactly those unchanged,
/// see [`crate::auth`]). The error says why, for messages.
pub fn check_user_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_USER_NAME_LEN {
        return Err("longer than 256 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    Ok(())
}

/// A MUPDATE user's credential as the registry replicates it: the admin
/// flag and the salted SCRAM-SHA-256 keys of RFC 5802 (which also verify
/// PLAIN logins: PBKDF2 of the offered password must give `stored_key`).
/// The password itself is never stored nor sent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCredential {
    /// Whether the user may run writes and administrative commands.
    pub admin: bool,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// `H(ClientKey)`.
    pub stored_key: [u8; SCRAM_KEY_LEN],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; SCRAM_KEY_LEN],
}

/// Keeps the keys out of logs and panic messages.
impl fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserCredential")
            .field("admin", &self.admin)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl UserCredential {
    /// Whether the secrets are plausible (see [`Refusal::InvalidCredential`]).
    pub fn is_valid(&self) -> bool {
        !self.salt.is_empty()
            && self.salt.len() <= MAX_SALT_LEN
            && (1..=MAX_ITERATIONS).contains(&self.iterations)
    }
}

/// What the registry holds under a user name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredUser {
    /// A user that can log in.
    Active(UserCredential),
    /// A deleted user. The registry decides about every name it has ever
    /// held, so a deletion also overrides a node's users file.
    Deleted,
}

impl StoredUser {
    /// The credential, unless the user was deleted.
    pub fn active(&self) -> Option<&UserCredential> {
        match self {
            StoredUser::Active(c) => Some(c),
            StoredUser::Deleted => None,
        }
    }
}

/// A byte permutation whose byte order is [`cyrus_mailbox_cmp`]'s rank
/// order: NUL, tab, newline, `.`, then 1..=8, then every other byte in its
/// place (tab and newline, equal for Cyrus, get an order of their own).
const CYRUS_ORDER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            0 => 0,
            b'\t' => 1,
            b'\n' => 2,
            b'.' => 3,
            x @ 1..=8 => x + 3,
            x @ 11..=45 => x + 1,
            x => x,
        };
        c += 1;
    }
    t
};

/// The storage key of the mailbox `name`: its bytes mapped so that plain
/// byte order is Cyrus's mailbox order ([`cyrus_mailbox_cmp`]), so that a
/// walk of the keys lists mailboxes the way Cyrus expects, and a name
/// prefix is a key prefix. Never holds 0xFF (UTF-8 does not).
pub fn cyrus_order_key(name: &str) -> Vec<u8> {
    name.bytes().map(|b| CYRUS_ORDER[b as usize]).collect()
}

/// A registry command: one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryCommand {
    /// Reserve `name` at `location` (a backend starts creating it).
    Reserve {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
    },
    /// Make `name` active at `location` with `acl`.
    Activate {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
        /// ACL string.
        acl: String,
    },
    /// Turn an active mailbox back into a reservation at `location`.
    Deactivate {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
    },
    /// Remove `name`.
    Delete {
        /// Mailbox name.
        name: String,
    },
    /// Several commands applied in order in one log entry, each with its own
    /// outcome (a backend's full push, a user import).
    Batch(Vec<RegistryCommand>),
    /// Add a MUPDATE user; refused if the name is taken.
    AddUser {
        /// User name.
        name: String,
        /// Its admin flag and SCRAM-SHA-256 secrets (never the password).
        credential: UserCredential,
    },
    /// Replace a user's secrets (a password change); the admin flag stays.
    SetUserPassword {
        /// User name.
        name: String,
        /// The new secrets; its `admin` field is ignored.
        credential: UserCredential,
    },
    /// Remove a user. The name is remembered as deleted, so that a users
    /// file that still lists it cannot bring it back (see [`StoredUser`]);
    /// a name the registry never held is marked so too (it may be in a
    /// node's users file). Refused only for a name already deleted.
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Sets `name` to `new` (deletes it when `None`) only if it now reads
    /// `expected` (`None`: absent) or already reads `new`; otherwise refused
    /// with [`Refusal::Changed`]. Import, load, `check --fix` and the shadow
    /// of a Cyrus master write this way, so that they never overwrite a
    /// change someone else made meanwhile. Never sent by MUPDATE peers.
    Conditional {
        /// Mailbox name.
        name: String,
        /// What the writer believes the entry reads now.
        expected: Option<Placement>,
        /// What it should read afterwards.
        new: Option<Placement>,
    },
}

/// Where and how a mailbox is held, without its name and log index: what a
/// [`RegistryCommand::Conditional`] compares and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `server!partition`.
    pub location: String,
    /// ACL string.
    pub acl: String,
    /// Reserved or active.
    pub state: MailboxState,
}

impl Placement {
    /// The placement of `entry`.
    pub fn of(entry: &MailboxEntry) -> Placement {
        Placement {
            location: entry.location.clone(),
            acl: entry.acl.clone(),
            state: entry.state,
        }
    }

    /// The entry named `name` placed here (log index unknown: 0).
    pub fn entry(&self, name: &str) -> MailboxEntry {
        MailboxEntry {
            name: name.to_owned(),
            location: self.location.clone(),
            acl: self.acl.clone(),
            state: self.state,
            last_change: 0,
        }
    }

    /// The server part of the location.
    pub fn server(&self) -> &str {
        server_of(&self.location)
    }
}

impl RegistryCommand {
    /// The mailbox name this command is about (`None` for a batch).
    pub fn mailbox(&self) -> Option<&str> {
        match self {
            Self::Reserve { name, .. }
            | Self::Activate { name, .. }
            | Self::Deactivate { name, .. }
            | Self::Delete { name }
            | Self::Conditional { name, .. } => Some(name),
            Self::Batch(_)
            | Self::AddUser { .. }
            | Self::SetUserPassword { .. }
            | Self::DeleteUser { .. } => None,
        }
    }

    /// Calls `f` with every mailbox name the command (or batch) is about.
    pub fn for_each_mailbox(&self, f: &mut impl FnMut(&str)) {
        match self {
            Self::Batch(commands) => commands.iter().for_each(|c| c.for_each_mailbox(f)),
            other => {
                if let Some(n) = other.mailbox() {
                    f(n)
                }
            }
        }
    }
}

impl fmt::Display for RegistryCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reserve { name, location } => write!(f, "RESERVE {name} {location}"),
            Self::Activate { name, location, .. } => write!(f, "ACTIVATE {name} {location}"),
            Self::Deactivate { name, location } => write!(f, "DEACTIVATE {name} {location}"),
            Self::Delete { name } => write!(f, "DELETE {name}"),
            Self::Batch(commands) => write!(f, "BATCH of {}", commands.len()),
            // Never the secrets: this text goes to logs.
            Self::AddUser { name, credential } => {
                write!(
                    f,
                    "ADD USER {name}{}",
                    if credential.admin { " (admin)" } else { "" }
                )
            }
            Self::SetUserPassword { name, .. } => write!(f, "SET PASSWORD OF USER {name}"),
            Self::DeleteUser { name } => write!(f, "DELETE USER {name}"),
            Self::Conditional { name, new, .. } => match new {
                Some(p) => write!(f, "CONDITIONAL {name} {}", p.location),
                None => write!(f, "CONDITIONAL DELETE {name}"),
            },
        }
    }
}

/// Why a command was refused. The `Display` texts are what MUPDATE's `NO`
/// carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// RESERVE of a name that exists at another location.
    AlreadyExists,
    /// DEACTIVATE of a mailbox that is not active.
    NotActive,
    /// DEACTIVATE or DELETE of an unknown name.
    DoesNotExist,
    /// An empty mailbox name.
    InvalidName,
    /// An empty location.
    InvalidLocation,
    /// A request older than one its session already completed: a delayed
    /// copy of a retried request, whose client has moved on.
    Superseded,
    /// ADD USER of a name that is taken.
    UserExists,
    /// A password change of an unknown or deleted user, or the deletion
    /// of a deleted one.
    NoSuchUser,
    /// A user name outside the accepted character set or length.
    InvalidUserName,
    /// Secrets that cannot be right: empty or oversized salt, iterations
    /// out of range.
    InvalidCredential,
    /// A [`RegistryCommand::Conditional`] found the entry neither as
    /// expected nor already as wanted.
    Changed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AlreadyExists => "mailbox already exists",
            Self::NotActive => "mailbox not currently active",
            Self::DoesNotExist => "mailbox doesn't exist",
            Self::InvalidName => "invalid mailbox name",
            Self::InvalidLocation => "invalid mailbox location",
            Self::Superseded => "request superseded by a later one of the same session",
            Self::UserExists => "user already exists",
            Self::NoSuchUser => "no such user",
            Self::InvalidUserName => "invalid user name",
            Self::InvalidCredential => "invalid credential",
            Self::Changed => "mailbox changed meanwhile",
        })
    }
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied.
    Done,
    /// Refused; the state is unchanged.
    Refused(Refusal),
    /// One outcome per command of a batch, in order.
    Batch(Vec<Outcome>),
}

/// One change to the registry, as the UPDATE stream and replicas see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The entry now reads like this (created or changed).
    Put {
        /// The new entry.
        entry: MailboxEntry,
        /// Its location before the change, if it existed (a partial UPDATE
        /// stream sends a change when the old or the new server matches).
        previous_location: Option<String>,
    },
    /// The mailbox was deleted at this log index.
    Removed {
        /// Mailbox name.
        name: String,
        /// Log index of the deletion.
        index: u64,
        /// Its location before the deletion.
        previous_location: String,
    },
}

impl Change {
    /// The mailbox name this change is about.
    pub fn name(&self) -> &str {
        match self {
            Self::Put { entry, .. } => &entry.name,
            Self::Removed { name, .. } => name,
        }
    }
}

/// Read access to the current registry state, for [`apply`].
pub trait MailboxLookup {
    /// Storage error.
    type Error;
    /// The entry named `name`, if any.
    fn mailbox(&self, name: &str) -> Result<Option<MailboxEntry>, Self::Error>;
}

impl MailboxLookup for std::collections::BTreeMap<String, MailboxEntry> {
    type Error = std::convert::Infallible;
    fn mailbox(&self, name: &str) -> Result<Option<MailboxEntry>, Self::Error> {
        Ok(self.get(name).cloned())
    }
}

/// Read access to the replicated users, for [`apply`].
pub trait UserLookup: MailboxLookup {
    /// What the registry holds under `name`, if it ever held it.
    fn user(&self, name: &str) -> Result<Option<StoredUser>, Self::Error>;
}

/// How long a client session is remembered after its last request, in the
/// leaders' clock. A retry of an ambiguous write comes within the write
/// timeout (seconds); this is far longer, so a retry always finds its
/// session, and the session table stays the size of the clients active in
/// the last minutes.
pub const SESSION_TTL_MS: u64 = 10 * 60 * 1000;

/// Identifies one client request across its retries (the Raft dissertation's
/// client session and sequence number, §6.3). A session sends one request
/// at a time, with increasing sequence numbers; a retry sends the same tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientTag {
    /// Random id of the session (a MUPDATE connection, a replica's forwarded
    /// write, an admin call).
    pub session: u64,
    /// The request's number within the session.
    pub seq: u64,
}

/// A client's session: a random id and the number of its next request. One
/// request at a time per session; [`ClientSession::next_request`] numbers it.
#[derive(Debug, Clone)]
pub struct ClientSession {
    id: u64,
    next_seq: u64,
}

impl ClientSession {
    /// A new session with a random id.
    pub fn new() -> ClientSession {
        ClientSession {
            id: rand::random(),
            next_seq: 1,
        }
    }

    /// The tag of the session's next request; its retries reuse it.
    pub fn next_request(&mut self) -> ClientTag {
        let seq = self.next_seq;
        self.next_seq += 1;
        ClientTag {
            session: self.id,
            seq,
        }
    }
}

impl Default for ClientSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientTag {
    /// The only request of a new one-off session (an admin call, a test).
    pub fn once() -> ClientTag {
        ClientSession::new().next_request()
    }
}

/// A Raft log entry's payload: a command, the request it answers, and the
/// leader's clock when it was proposed. Session expiry runs on that stamped
/// clock, never on a node's own, so every node applies the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The request's session and number; `None` for requests that are never
    /// retried.
    pub client: Option<ClientTag>,
    /// Milliseconds since the Unix epoch on the proposing leader.
    pub stamp_ms: u64,
    /// What to do.
    pub command: RegistryCommand,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.client {
            Some(c) => write!(f, "{} (session {:x} #{})", self.command, c.session, c.seq),
            None => self.command.fmt(f),
        }
    }
}

/// The last request a session completed, and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The answer, given again to a duplicate.
    pub outcome: Outcome,
    /// The registry clock when it was applied.
    pub stamp_ms: u64,
}

impl SessionRecord {
    /// Whether the session is forgotten at registry clock `clock_ms`.
    pub fn expired(&self, clock_ms: u64) -> bool {
        self.stamp_ms.saturating_add(SESSION_TTL_MS) < clock_ms
    }
}

/// Read access to the whole replicated state: mailboxes, client sessions
/// and the registry clock (the largest leader stamp applied so far).
pub trait RegistryState: UserLookup {
    /// The session `id`'s record, expired or not.
    fn session(&self, id: u64) -> Result<Option<SessionRecord>, Self::Error>;
    /// The registry clock, in milliseconds since the epoch.
    fn clock_ms(&self) -> Result<u64, Self::Error>;
}

/// What applying a [`Proposal`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedProposal {
    /// The command's outcome and changes (none for a duplicate).
    pub applied: Applied,
    /// The session record to store, if it changed.
    pub session: Option<(u64, SessionRecord)>,
    /// The registry clock after this entry.
    pub clock_ms: u64,
    /// The request was a duplicate: its stored answer was returned.
    pub duplicate: bool,
}

/// Applies a proposal at log `index`: a request its session already
/// completed gets the stored answer and changes nothing, so a retried write
/// is applied exactly once; anything else goes to [`apply`].
pub fn apply_proposal<L: RegistryState>(
    state: &L,
    index: u64,
    proposal: &Proposal,
) -> Result<AppliedProposal, L::Error> {
    let clock_ms = state.clock_ms()?.max(proposal.stamp_ms);
    let answered = |outcome: Outcome, duplicate| AppliedProposal {
        applied: Applied {
            outcome,
            changes: Vec::new(),
            users: Vec::new(),
        },
        session: None,
        clock_ms,
        duplicate,
    };
    if let Some(tag) = proposal.client {
        if let Some(last) = state.session(tag.session)?.filter(|r| !r.expired(clock_ms)) {
            if tag.seq == last.seq {
                return Ok(answered(last.outcome, true));
            }
            if tag.seq < last.seq {
                return Ok(answered(Outcome::Refused(Refusal::Superseded), true));
            }
        }
    }
    let applied = apply(state, index, &proposal.command)?;
    let session = proposal.client.map(|tag| {
        (
            tag.session,
            SessionRecord {
                seq: tag.seq,
                outcome: applied.outcome.clone(),
                stamp_ms: clock_ms,
            },
        )
    });
    Ok(AppliedProposal {
        applied,
        session,
        clock_ms,
        duplicate: false,
    })
}

/// What applying a command produced: its outcome and the changes to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The answer for the client.
    pub outcome: Outcome,
    /// The changes, in order; a name may appear more than once in a batch.
    pub changes: Vec<Change>,
    /// The users written, in order. Kept apart from `changes`: UPDATE
    /// streams and proxies follow mailboxes only.
    pub users: Vec<(String, StoredUser)>,
}

/// Applies `command` at log `index` against `state`.
///
/// Pure: it reads through `state` and returns the changes without writing
/// them. Later commands of a batch see the changes of earlier ones.
pub fn apply<L: UserLookup>(
    state: &L,
    index: u64,
    command: &RegistryCommand,
) -> Result<Applied, L::Error> {
    let mut overlay = Overlay {
        base: state,
        pending: HashMap::new(),
        users: Vec::new(),
    };
    let mut changes = Vec::new();
    let outcome = apply_one(&mut overlay, index, command, &mut changes)?;
    Ok(Applied {
        outcome,
        changes,
        users: overlay.users,
    })
}

/// The state as seen by the commands of one batch: the store plus the changes
/// made so far.
struct Overlay<'a, L> {
    base: &'a L,
    pending: HashMap<String, Option<MailboxEntry>>,
    /// Users written so far, in order (the last write of a name wins).
    users: Vec<(String, StoredUser)>,
}

impl<L: UserLookup> Overlay<'_, L> {
    fn user(&self, name: &str) -> Result<Option<StoredUser>, L::Error> {
        match self.users.iter().rev().find(|(n, _)| n == name) {
            Some((_, u)) => Ok(Some(u.clone())),
            None => self.base.user(name),
        }
    }

    fn get(&self, name: &str) -> Result<Option<MailboxEntry>, L::Error> {
        match self.pending.get(name) {
            Some(e) => Ok(e.clone()),
            None => self.base.mailbox(name),
        }
    }

    fn record(&mut self, change: Change, changes: &mut Vec<Change>) {
        match &change {
            Change::Put { entry, .. } => {
                self.pending.insert(entry.name.clone(), Some(entry.clone()))
            }
            Change::Removed { name, .. } => self.pending.insert(name.clone(), None),
        };
        changes.push(change);
    }
}

fn apply_one<L: UserLookup>(
    st: &mut Overlay<'_, L>,
    index: u64,
    command: &RegistryCommand,
    changes: &mut Vec<Change>,
) -> Result<Outcome, L::Error> {
    if let Some(name) = command.mailbox() {
        if name.is_empty() {
            return Ok(Outcome::Refused(Refusal::InvalidName));
        }
    }
    let put = |name: &str, location: &str, acl: &str, state, previous: Option<MailboxEntry>| {
        Change::Put {
            entry: MailboxEntry {
                name: name.to_owned(),
                location: location.to_owned(),
                acl: acl.to_owned(),
                state,
                last_change: index,
            },
            previous_location: previous.map(|p| p.location),
        }
    };
    let outcome = match command {
        RegistryCommand::Reserve { name, location } => {
            if location.is_empty() {
                return Ok(Outcome::Refused(Refusal::InvalidLocation));
            }
            match st.get(name)? {
                // Cyrus: a RESERVE at the same location succeeds even over an
                // active entry, which becomes a reservation without its ACL.
                Some(e) if e.location != *location => Outcome::Refused(Refusal::AlreadyExists),
                previous => {
                    st.record(
                        put(name, location, "", MailboxState::Reserved, previous),
                        changes,
                    );
                    Outcome::Done
                }
            }
        }
        RegistryCommand::Activate {
            name,
            location,
            acl,
        } => {
            if location.is_empty() {
                return Ok(Outcome::Refused(Refusal::InvalidLocation));
            }
            // Cyrus: ACTIVATE needs no reservation and overwrites the location
            // (this is how XFER moves a mailbox and how `ctl_mboxlist -m`
            // pushes a backend's list).
            let previous = st.get(name)?;
            st.record(
                put(name, location, acl, MailboxState::Active, previous),
                changes,
            );
            Outcome::Done
        }
        RegistryCommand::Deactivate { name, location } => match st.get(name)? {
            None => Outcome::Refused(Refusal::DoesNotExist),
            Some(e) if e.state != MailboxState::Active => Outcome::Refused(Refusal::NotActive),
            Some(e) => {
                if location.is_empty() {
                    return Ok(Outcome::Refused(Refusal::InvalidLocation));
                }
                let acl = e.acl.clone();
                st.record(
                    put(name, location, &acl, MailboxState::Reserved, Some(e)),
                    changes,
                );
                Outcome::Done
            }
        },
        RegistryCommand::Delete { name } => match st.get(name)? {
            None => Outcome::Refused(Refusal::DoesNotExist),
            Some(e) => {
                st.record(
                    Change::Removed {
                        name: name.clone(),
                        index,
                        previous_location: e.location,
                    },
                    changes,
                );
                Outcome::Done
            }
        },
        RegistryCommand::Batch(commands) => {
            let mut outcomes = Vec::with_capacity(commands.len());
            for c in commands {
                outcomes.push(apply_one(st, index, c, changes)?);
            }
            Outcome::Batch(outcomes)
        }
        RegistryCommand::AddUser { name, credential } => {
            if check_user_name(name).is_err() {
                return Ok(Outcome::Refused(Refusal::InvalidUserName));
            }
            if !credential.is_valid() {
                return Ok(Outcome::Refused(Refusal::InvalidCredential));
            }
            match st.user(name)? {
                Some(StoredUser::Active(_)) => Outcome::Refused(Refusal::UserExists),
                // A deleted name may be added again.
                None | Some(StoredUser::Deleted) => {
                    st.users
                        .push((name.clone(), StoredUser::Active(credential.clone())));
                    Outcome::Done
                }
            }
        }
        RegistryCommand::SetUserPassword { name, credential } => {
            if !credential.is_valid() {
                return Ok(Outcome::Refused(Refusal::InvalidCredential));
            }
            match st.user(name)? {
                Some(StoredUser::Active(old)) => {
                    let new = UserCredential {
                        admin: old.admin,
                        ..credential.clone()
                    };
                    st.users.push((name.clone(), StoredUser::Active(new)));
                    Outcome::Done
                }
                None | Some(StoredUser::Deleted) => Outcome::Refused(Refusal::NoSuchUser),
            }
        }
        RegistryCommand::DeleteUser { name } => match st.user(name)? {
            // A name the registry never held may still be in some node's
            // users file: the mark refuses it there too.
            Some(StoredUser::Active(_)) | None => {
                if check_user_name(name).is_err() {
                    return Ok(Outcome::Refused(Refusal::InvalidUserName));
                }
                st.users.push((name.clone(), StoredUser::Deleted));
                Outcome::Done
            }
            Some(StoredUser::Deleted) => Outcome::Refused(Refusal::NoSuchUser),
        },
        RegistryCommand::Conditional {
            name,
            expected,
            new,
        } => {
            if new.as_ref().is_some_and(|p| p.location.is_empty()) {
                return Ok(Outcome::Refused(Refusal::InvalidLocation));
            }
            let current = st.get(name)?;
            let now = current.as_ref().map(Placement::of);
            if now == *new {
                // Already as wanted: a repeated import changes nothing.
                Outcome::Done
            } else if now != *expected {
                Outcome::Refused(Refusal::Changed)
            } else {
                match (new, current) {
                    (Some(p), previous) => {
                        st.record(put(name, &p.location, &p.acl, p.state, previous), changes)
                    }
                    (None, Some(e)) => st.record(
                        Change::Removed {
                            name: name.clone(),
                            index,
                            previous_location: e.location,
                        },
                        changes,
                    ),
                    // Absent and wanted absent was answered above.
                    (None, None) => {}
                }
                Outcome::Done
            }
        }
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type State = BTreeMap<String, MailboxEntry>;

    /// The mailbox-only test state holds no users.
    impl UserLookup for State {
        fn user(&self, _name: &str) -> Result<Option<StoredUser>, Self::Error> {
            Ok(None)
        }
    }

    /// The states a mailbox can be in before a command.
    #[derive(Debug, Clone, Copy)]
    enum Before {
        Absent,
        ReservedHere,
        ReservedElsewhere,
        ActiveHere,
        ActiveElsewhere,
    }

    const ALL: [Before; 5] = [
        Before::Absent,
        Before::ReservedHere,
        Before::ReservedElsewhere,
        Before::ActiveHere,
        Before::ActiveElsewhere,
    ];
    const HERE: &str = "be1!default";
    const THERE: &str = "be2!default";
    const ACL: &str = "alice\tlrswipkxtecdan\t";

    fn state(before: Before) -> State {
        let mut s = State::new();
        let (location, st) = match before {
            Before::Absent => return s,
            Before::ReservedHere => (HERE, MailboxState::Reserved),
            Before::ReservedElsewhere => (THERE, MailboxState::Reserved),
            Before::ActiveHere => (HERE, MailboxState::Active),
            Before::ActiveElsewhere => (THERE, MailboxState::Active),
        };
        let acl = if st == MailboxState::Active {
            "old\tlr\t"
        } else {
            ""
        };
        s.insert(
            "user.alice".into(),
            MailboxEntry {
                name: "user.alice".into(),
                location: location.into(),
                acl: acl.into(),
                state: st,
                last_change: 1,
            },
        );
        s
    }

    fn run(s: &mut State, index: u64, c: &RegistryCommand) -> Outcome {
        let applied = apply(s, index, c).unwrap();
        for ch in applied.changes {
            match ch {
                Change::Put { entry, .. } => {
                    s.insert(entry.name.clone(), entry);
                }
                Change::Removed { name, .. } => {
                    s.remove(&name);
                }
            }
        }
        applied.outcome
    }

    fn entry(s: &State) -> Option<(String, String, MailboxState, u64)> {
        s.get("user.alice")
            .map(|e| (e.location.clone(), e.acl.clone(), e.state, e.last_change))
    }

    fn reserve(location: &str) -> RegistryCommand {
        RegistryCommand::Reserve {
            name: "user.alice".into(),
            location: location.into(),
        }
    }
    fn activate(location: &str) -> RegistryCommand {
        RegistryCommand::Activate {
            name: "user.alice".into(),
            location: location.into(),
            acl: ACL.into(),
        }
    }
    fn deactivate(location: &str) -> RegistryCommand {
        RegistryCommand::Deactivate {
            name: "user.alice".into(),
            location: location.into(),
        }
    }
    fn delete() -> RegistryCommand {
        RegistryCommand::Delete {
            name: "user.alice".into(),
        }
    }

    use MailboxState::{Active, Reserved};

    #[test]
    fn reserve_in_every_state() {
        for before in ALL {
            let mut s = state(before);
            let out = run(&mut s, 7, &reserve(HERE));
            match before {
                Before::Absent | Before::ReservedHere | Before::ActiveHere => {
                    assert_eq!(out, Outcome::Done, "{before:?}");
                    assert_eq!(
                        entry(&s),
                        Some((HERE.into(), String::new(), Reserved, 7)),
                        "{before:?}: reserved here, ACL dropped"
                    );
                }
                Before::ReservedElsewhere | Before::ActiveElsewhere => {
                    assert_eq!(out, Outcome::Refused(Refusal::AlreadyExists), "{before:?}");
                    assert_eq!(s, state(before), "{before:?}: unchanged");
                }
            }
        }
    }

    #[test]
    fn activate_in_every_state_overwrites() {
        for before in ALL {
            let mut s = state(before);
            assert_eq!(run(&mut s, 9, &activate(HERE)), Outcome::Done, "{before:?}");
            assert_eq!(entry(&s), Some((HERE.into(), ACL.into(), Active, 9)));
        }
    }

    #[test]
    fn deactivate_in_every_state() {
        for before in ALL {
            let mut s = state(before);
            let out = run(&mut s, 4, &deactivate(HERE));
            match before {
                Before::Absent => {
                    assert_eq!(out, Outcome::Refused(Refusal::DoesNotExist));
                    assert!(s.is_empty());
                }
                Before::ReservedHere | Before::ReservedElsewhere => {
                    assert_eq!(out, Outcome::Refused(Refusal::NotActive), "{before:?}");
                    assert_eq!(s, state(before));
                }
                Before::ActiveHere | Before::ActiveElsewhere => {
                    assert_eq!(out, Outcome::Done, "{before:?}");
                    let (loc, _, st, idx) = entry(&s).unwrap();
                    assert_eq!((loc.as_str(), st, idx), (HERE, Reserved, 4));
                }
            }
        }
    }

    #[test]
    fn delete_in_every_state() {
        for before in ALL {
            let mut s = state(before);
            let applied = apply(&s, 5, &delete()).unwrap();
            match before {
                Before::Absent => {
                    assert_eq!(applied.outcome, Outcome::Refused(Refusal::DoesNotExist));
                    assert!(applied.changes.is_empty());
                }
                _ => {
                    assert_eq!(applied.outcome, Outcome::Done, "{before:?}");
                    assert_eq!(
                        applied.changes,
                        vec![Change::Removed {
                            name: "user.alice".into(),
                            index: 5,
                            previous_location: applied_location(before).into(),
                        }]
                    );
                    run(&mut s, 5, &delete());
                    assert!(s.is_empty());
                }
            }
        }
    }

    fn applied_location(before: Before) -> &'static str {
        match before {
            Before::ReservedElsewhere | Before::ActiveElsewhere => THERE,
            _ => HERE,
        }
    }

    #[test]
    fn changes_carry_the_previous_location() {
        let s = state(Before::ActiveElsewhere);
        let applied = apply(&s, 8, &activate(HERE)).unwrap();
        match &applied.changes[..] {
            [Change::Put {
                previous_location, ..
            }] => assert_eq!(previous_location.as_deref(), Some(THERE)),
            other => panic!("unexpected {other:?}"),
        }
        let applied = apply(&State::new(), 8, &activate(HERE)).unwrap();
        assert!(matches!(
            &applied.changes[..],
            [Change::Put {
                previous_location: None,
                ..
            }]
        ));
    }

    #[test]
    fn refusals_change_nothing_and_report_no_changes() {
        let s = state(Before::ActiveElsewhere);
        let applied = apply(&s, 3, &reserve(HERE)).unwrap();
        assert!(applied.changes.is_empty());
    }

    #[test]
    fn empty_name_and_location_are_refused() {
        let mut s = State::new();
        for c in [
            RegistryCommand::Reserve {
                name: String::new(),
                location: HERE.into(),
            },
            RegistryCommand::Delete {
                name: String::new(),
            },
        ] {
            assert_eq!(run(&mut s, 1, &c), Outcome::Refused(Refusal::InvalidName));
        }
        assert_eq!(
            run(&mut s, 1, &reserve("")),
            Outcome::Refused(Refusal::InvalidLocation)
        );
        assert_eq!(
            run(&mut s, 1, &activate("")),
            Outcome::Refused(Refusal::InvalidLocation)
        );
        assert!(s.is_empty());
        // Cyrus 3.6.1 sends an empty partition on RENAME: keep it.
        assert_eq!(run(&mut s, 2, &reserve("be1!")), Outcome::Done);
    }

    #[test]
    fn batch_sees_its_own_earlier_changes() {
        let mut s = State::new();
        let batch = RegistryCommand::Batch(vec![
            reserve(HERE),
            reserve(THERE),
            activate(HERE),
            deactivate(THERE),
            delete(),
            delete(),
        ]);
        let out = run(&mut s, 11, &batch);
        assert_eq!(
            out,
            Outcome::Batch(vec![
                Outcome::Done,
                Outcome::Refused(Refusal::AlreadyExists),
                Outcome::Done,
                Outcome::Done,
                Outcome::Done,
                Outcome::Refused(Refusal::DoesNotExist),
            ])
        );
        assert!(s.is_empty());
    }

    #[test]
    fn rename_as_cyrus_sends_it() {
        let mut s = state(Before::ActiveHere);
        assert_eq!(run(&mut s, 2, &delete()), Outcome::Done);
        let new = |c: &RegistryCommand| match c {
            RegistryCommand::Reserve { location, .. } => RegistryCommand::Reserve {
                name: "user.alice2".into(),
                location: location.clone(),
            },
            _ => unreachable!(),
        };
        assert_eq!(run(&mut s, 3, &new(&reserve("be1!"))), Outcome::Done);
        assert_eq!(s["user.alice2"].state, Reserved);
    }

    #[test]
    fn mailbox_order_puts_the_separator_first() {
        let mut names = vec![
            "user.alice-work",
            "user.alice.Drafts",
            "user.alice",
            "user.alice0",
            "user.b",
        ];
        names.sort_by(|a, b| cyrus_mailbox_cmp(a, b));
        assert_eq!(
            names,
            [
                "user.alice",
                "user.alice.Drafts",
                "user.alice-work",
                "user.alice0",
                "user.b"
            ]
        );
    }

    /// A whole replicated state for the session tests.
    #[derive(Default)]
    struct Full {
        mailboxes: State,
        users: HashMap<String, StoredUser>,
        sessions: HashMap<u64, SessionRecord>,
        clock: u64,
    }

    impl UserLookup for Full {
        fn user(&self, name: &str) -> Result<Option<StoredUser>, Self::Error> {
            Ok(self.users.get(name).cloned())
        }
    }

    impl MailboxLookup for Full {
        type Error = std::convert::Infallible;
        fn mailbox(&self, name: &str) -> Result<Option<MailboxEntry>, Self::Error> {
            Ok(self.mailboxes.get(name).cloned())
        }
    }

    impl RegistryState for Full {
        fn session(&self, id: u64) -> Result<Option<SessionRecord>, Self::Error> {
            Ok(self.sessions.get(&id).cloned())
        }
        fn clock_ms(&self) -> Result<u64, Self::Error> {
            Ok(self.clock)
        }
    }

    impl Full {
        fn propose(&mut self, index: u64, seq: u64, stamp_ms: u64, c: RegistryCommand) -> Outcome {
            let p = Proposal {
                client: Some(ClientTag { session: 7, seq }),
                stamp_ms,
                command: c,
            };
            let r = apply_proposal(self, index, &p).unwrap();
            for change in r.applied.changes {
                match change {
                    Change::Put { entry, .. } => {
                        self.mailboxes.insert(entry.name.clone(), entry);
                    }
                    Change::Removed { name, .. } => {
                        self.mailboxes.remove(&name);
                    }
                }
            }
            for (name, user) in r.applied.users {
                self.users.insert(name, user);
            }
            if let Some((id, rec)) = r.session {
                self.sessions.insert(id, rec);
            }
            self.clock = r.clock_ms;
            r.applied.outcome
        }
    }

    #[test]
    fn a_duplicate_reserve_after_activate_changes_nothing() {
        let mut s = Full::default();
        assert_eq!(s.propose(1, 1, 1_000, reserve(HERE)), Outcome::Done);
        assert_eq!(s.propose(2, 2, 1_001, activate(HERE)), Outcome::Done);
        // The RESERVE's retry lands after the ACTIVATE (an ambiguous
        // ForwardToLeader): without the session table it would turn the
        // mailbox back into a reservation and drop its ACL.
        assert_eq!(
            s.propose(3, 1, 1_002, reserve(HERE)),
            Outcome::Refused(Refusal::Superseded)
        );
        let e = &s.mailboxes["user.alice"];
        assert_eq!((e.state, e.acl.as_str()), (MailboxState::Active, ACL));
    }

    #[test]
    fn a_duplicate_gets_the_stored_answer() {
        let mut s = Full::default();
        assert_eq!(s.propose(1, 1, 1_000, activate(HERE)), Outcome::Done);
        assert_eq!(s.propose(2, 2, 1_000, delete()), Outcome::Done);
        // The DELETE applied again would answer "doesn't exist".
        assert_eq!(s.propose(3, 2, 1_000, delete()), Outcome::Done);
        // A duplicate of a refusal is refused the same way, not re-run.
        assert_eq!(
            s.propose(4, 3, 1_000, deactivate(HERE)),
            Outcome::Refused(Refusal::DoesNotExist)
        );
        assert_eq!(s.propose(5, 4, 1_000, activate(HERE)), Outcome::Done);
        assert_eq!(
            s.propose(6, 3, 1_000, deactivate(HERE)),
            Outcome::Refused(Refusal::Superseded)
        );
        assert_eq!(s.mailboxes["user.alice"].state, MailboxState::Active);
    }

    #[test]
    fn sessions_expire_by_the_stamped_clock_only() {
        let mut s = Full::default();
        assert_eq!(s.propose(1, 1, 1_000, reserve(HERE)), Outcome::Done);
        assert_eq!(s.propose(2, 2, 1_000, delete()), Outcome::Done);
        // A leader with a clock behind the registry clock does not move it back.
        assert_eq!(s.propose(3, 2, 5, delete()), Outcome::Done);
        assert_eq!(s.clock, 1_000);
        // Within the TTL the session is known; past it, forgotten.
        assert_eq!(
            s.propose(4, 2, 1_000 + SESSION_TTL_MS, delete()),
            Outcome::Done
        );
        assert_eq!(
            s.propose(5, 2, 1_001 + SESSION_TTL_MS, delete()),
            Outcome::Refused(Refusal::DoesNotExist)
        );
    }

    #[test]
    fn untagged_proposals_are_plain_applies() {
        let mut s = Full::default();
        let p = Proposal {
            client: None,
            stamp_ms: 3,
            command: delete(),
        };
        let r = apply_proposal(&s, 1, &p).unwrap();
        assert_eq!(r.applied.outcome, Outcome::Refused(Refusal::DoesNotExist));
        assert!(r.session.is_none() && !r.duplicate);
        s.clock = r.clock_ms;
        assert_eq!(s.clock, 3);
    }

    #[test]
    fn client_sessions_number_their_requests() {
        let mut c = ClientSession::new();
        let (a, b) = (c.next_request(), c.next_request());
        assert_eq!((a.session, a.seq + 1), (b.session, b.seq));
        assert_ne!(ClientTag::once().session, ClientTag::once().session);
    }

    fn credential(admin: bool, key: u8) -> UserCredential {
        UserCredential {
            admin,
            salt: vec![key; 16],
            iterations: 4096,
            stored_key: [key; SCRAM_KEY_LEN],
            server_key: [key; SCRAM_KEY_LEN],
        }
    }

    #[test]
    fn users_are_added_changed_and_deleted_once() {
        let mut s = Full::default();
        let add = |admin, key| RegistryCommand::AddUser {
            name: "be1".into(),
            credential: credential(admin, key),
        };
        assert_eq!(s.propose(1, 1, 1, add(false, 1)), Outcome::Done);
        assert_eq!(
            s.propose(2, 2, 1, add(true, 2)),
            Outcome::Refused(Refusal::UserExists)
        );
        assert_eq!(s.users["be1"], StoredUser::Active(credential(false, 1)));
        // A password change keeps the admin flag, whatever the request says.
        let passwd = RegistryCommand::SetUserPassword {
            name: "be1".into(),
            credential: credential(true, 3),
        };
        assert_eq!(s.propose(3, 3, 1, passwd.clone()), Outcome::Done);
        assert_eq!(s.users["be1"], StoredUser::Active(credential(false, 3)));
        let delete = RegistryCommand::DeleteUser { name: "be1".into() };
        assert_eq!(s.propose(4, 4, 1, delete.clone()), Outcome::Done);
        assert_eq!(s.users["be1"], StoredUser::Deleted);
        assert_eq!(
            s.propose(5, 5, 1, delete),
            Outcome::Refused(Refusal::NoSuchUser)
        );
        assert_eq!(
            s.propose(6, 6, 1, passwd),
            Outcome::Refused(Refusal::NoSuchUser)
        );
        // A deleted name can be added again.
        assert_eq!(s.propose(7, 7, 1, add(true, 4)), Outcome::Done);
        assert_eq!(s.users["be1"], StoredUser::Active(credential(true, 4)));
        // A name only some users file may hold is marked deleted too.
        let file_only = RegistryCommand::DeleteUser {
            name: "from-file".into(),
        };
        assert_eq!(s.propose(8, 8, 1, file_only), Outcome::Done);
        assert_eq!(s.users["from-file"], StoredUser::Deleted);
        // User commands touch no mailbox.
        assert!(s.mailboxes.is_empty());
    }

    #[test]
    fn bad_user_names_and_secrets_are_refused() {
        let mut s = Full::default();
        for name in ["", "has space", "tab\t", "\u{e9}t\u{e9}", &"x".repeat(257)] {
            assert_eq!(
                s.propose(
                    1,
                    1,
                    1,
                    RegistryCommand::AddUser {
                        name: name.into(),
                        credential: credential(false, 1),
                    }
                ),
                Outcome::Refused(Refusal::InvalidUserName),
                "{name:?}"
            );
            s.sessions.clear();
        }
        let mut bad = vec![];
        for (salt, iterations) in [(0, 4096), (257, 4096), (16, 0), (16, MAX_ITERATIONS + 1)] {
            bad.push(UserCredential {
                salt: vec![1; salt],
                iterations,
                ..credential(false, 1)
            });
        }
        for (i, c) in bad.into_iter().enumerate() {
            let i = i as u64 + 1;
            let add = RegistryCommand::AddUser {
                name: "be1".into(),
                credential: c,
            };
            assert_eq!(
                s.propose(i, i, 1, add),
                Outcome::Refused(Refusal::InvalidCredential)
            );
        }
        assert!(s.users.is_empty());
    }

    #[test]
    fn an_import_batch_sees_its_own_users() {
        let mut s = Full::default();
        let add = |name: &str, key| RegistryCommand::AddUser {
            name: name.into(),
            credential: credential(false, key),
        };
        let out = s.propose(
            1,
            1,
            1,
            RegistryCommand::Batch(vec![add("a", 1), add("b", 2), add("a", 3)]),
        );
        assert_eq!(
            out,
            Outcome::Batch(vec![
                Outcome::Done,
                Outcome::Done,
                Outcome::Refused(Refusal::UserExists)
            ])
        );
        assert_eq!(s.users["a"], StoredUser::Active(credential(false, 1)));
    }

    #[test]
    fn user_commands_never_show_secrets() {
        let c = RegistryCommand::AddUser {
            name: "be1".into(),
            credential: credential(true, 0xAB),
        };
        for text in [format!("{c}"), format!("{c:?}")] {
            assert!(text.contains("be1"), "{text}");
            assert!(!text.contains("171") && !text.contains("ab,"), "{text}");
        }
    }

    #[test]
    fn server_part_splits_at_first_bang() {
        assert_eq!(server_of("localhost:9143!default"), "localhost:9143");
        assert_eq!(server_of("be1!"), "be1");
        assert_eq!(server_of("nobang"), "nobang");
        assert_eq!(server_of("a!b!c"), "a");
    }

    fn conditional(expected: Option<Placement>, new: Option<Placement>) -> RegistryCommand {
        RegistryCommand::Conditional {
            name: "user.alice".into(),
            expected,
            new,
        }
    }

    fn placed(location: &str, acl: &str, state: MailboxState) -> Option<Placement> {
        Some(Placement {
            location: location.into(),
            acl: acl.into(),
            state,
        })
    }

    #[test]
    fn conditional_writes_only_over_what_it_expects() {
        for before in ALL {
            let now = state(before).get("user.alice").map(Placement::of);
            let wanted = placed(HERE, ACL, Active);
            // Expecting what is there: applied (or already so).
            let mut s = state(before);
            assert_eq!(
                run(&mut s, 5, &conditional(now.clone(), wanted.clone())),
                Outcome::Done,
                "{before:?}"
            );
            assert_eq!(entry(&s), Some((HERE.into(), ACL.into(), Active, 5)));
            // Expecting anything else: refused, unchanged.
            let other = placed("be9!x", "", Reserved);
            let mut s = state(before);
            assert_eq!(
                run(&mut s, 5, &conditional(other, wanted.clone())),
                Outcome::Refused(Refusal::Changed),
                "{before:?}"
            );
            assert_eq!(s, state(before), "{before:?}: unchanged");
            // A conditional delete.
            let mut s = state(before);
            assert_eq!(run(&mut s, 6, &conditional(now, None)), Outcome::Done);
            assert_eq!(entry(&s), None, "{before:?}");
        }
        // Already as wanted: done whatever was expected, nothing changes.
        let mut s = state(Before::ActiveHere);
        let wanted = s.get("user.alice").map(Placement::of);
        let applied = apply(&s, 8, &conditional(None, wanted.clone())).unwrap();
        assert_eq!(applied.outcome, Outcome::Done);
        assert!(applied.changes.is_empty());
        run(&mut s, 8, &conditional(None, wanted));
        assert_eq!(s, state(Before::ActiveHere));
        // Create over absent; refused over an entry elsewhere.
        let mut s = state(Before::Absent);
        let wanted = placed(HERE, ACL, Active);
        assert_eq!(
            run(&mut s, 3, &conditional(None, wanted.clone())),
            Outcome::Done
        );
        let mut s = state(Before::ActiveElsewhere);
        assert_eq!(
            run(&mut s, 3, &conditional(None, wanted)),
            Outcome::Refused(Refusal::Changed)
        );
        // No empty location.
        let mut s = state(Before::Absent);
        assert_eq!(
            run(&mut s, 3, &conditional(None, placed("", "", Active))),
            Outcome::Refused(Refusal::InvalidLocation)
        );
    }

    #[test]
    fn key_byte_order_is_cyrus_mailbox_order() {
        let names = [
            "user.a",
            "user.a.b",
            "user.a-b",
            "user.a b",
            "user.a\u{1}x",
            "user.ab",
            "user.a\tz",
            "user.a/b",
            "user.a_b",
            "user.A",
            "user.é",
            "user.a.b.c",
            "user",
            "user.a\u{8}",
            "user.a0",
            "example.com!user.x",
            "DELETED.user.a",
            "user.a,b",
            "user.a\u{b}",
            "user.a-",
        ];
        // The table is a permutation: distinct names, distinct keys.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..=255u8 {
            assert!(seen.insert(CYRUS_ORDER[i as usize]));
        }
        for a in names {
            for b in names {
                assert_eq!(
                    cyrus_order_key(a).cmp(&cyrus_order_key(b)),
                    cyrus_mailbox_cmp(a, b),
                    "{a:?} vs {b:?}"
                );
            }
        }
        assert!(!cyrus_order_key("user.é").contains(&0xFF));
    }
}
