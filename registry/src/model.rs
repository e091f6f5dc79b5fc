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
    /// outcome (a backend's full push).
    Batch(Vec<RegistryCommand>),
}

impl RegistryCommand {
    /// The mailbox name this command is about (`None` for a batch).
    pub fn mailbox(&self) -> Option<&str> {
        match self {
            Self::Reserve { name, .. }
            | Self::Activate { name, .. }
            | Self::Deactivate { name, .. }
            | Self::Delete { name } => Some(name),
            Self::Batch(_) => None,
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
pub trait RegistryState: MailboxLookup {
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
}

/// Applies `command` at log `index` against `state`.
///
/// Pure: it reads through `state` and returns the changes without writing
/// them. Later commands of a batch see the changes of earlier ones.
pub fn apply<L: MailboxLookup>(
    state: &L,
    index: u64,
    command: &RegistryCommand,
) -> Result<Applied, L::Error> {
    let mut overlay = Overlay {
        base: state,
        pending: HashMap::new(),
    };
    let mut changes = Vec::new();
    let outcome = apply_one(&mut overlay, index, command, &mut changes)?;
    Ok(Applied { outcome, changes })
}

/// The state as seen by the commands of one batch: the store plus the changes
/// made so far.
struct Overlay<'a, L> {
    base: &'a L,
    pending: HashMap<String, Option<MailboxEntry>>,
}

impl<L: MailboxLookup> Overlay<'_, L> {
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

fn apply_one<L: MailboxLookup>(
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
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type State = BTreeMap<String, MailboxEntry>;

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
        sessions: HashMap<u64, SessionRecord>,
        clock: u64,
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

    #[test]
    fn server_part_splits_at_first_bang() {
        assert_eq!(server_of("localhost:9143!default"), "localhost:9143");
        assert_eq!(server_of("be1!"), "be1");
        assert_eq!(server_of("nobang"), "nobang");
        assert_eq!(server_of("a!b!c"), "a");
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
