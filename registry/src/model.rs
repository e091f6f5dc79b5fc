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
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AlreadyExists => "mailbox already exists",
            Self::NotActive => "mailbox not currently active",
            Self::DoesNotExist => "mailbox doesn't exist",
            Self::InvalidName => "invalid mailbox name",
            Self::InvalidLocation => "invalid mailbox location",
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

    #[test]
    fn server_part_splits_at_first_bang() {
        assert_eq!(server_of("localhost:9143!default"), "localhost:9143");
        assert_eq!(server_of("be1!"), "be1");
        assert_eq!(server_of("nobang"), "nobang");
        assert_eq!(server_of("a!b!c"), "a");
    }
}
