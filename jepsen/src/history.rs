//! What a run records: every client operation as an invocation and a
//! completion, and every nemesis action, with monotonic timestamps.
//!
//! A completion is `ok` (the server answered; for a write that may be a
//! refusal, which is a definite outcome the model must predict), `fail`
//! (the operation certainly had no effect: the connection could not be
//! opened, or a read failed) or `info` (unknown: a timeout, a lost
//! connection, an unavailability answer to a write). `info` is never counted
//! as a failure: the checker lets such a write take effect at any point
//! after its invocation, or never.

use serde::{Deserialize, Serialize};

/// Invocation or completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The client is about to send the operation.
    Invoke,
    /// The server answered.
    Ok,
    /// The operation certainly did not take effect.
    Fail,
    /// Unknown whether it took effect.
    Info,
}

/// A registry operation on one mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum Op {
    /// RESERVE at `location`.
    Reserve {
        /// `server!partition`.
        location: String,
    },
    /// ACTIVATE at `location` with `acl`.
    Activate {
        /// `server!partition`.
        location: String,
        /// ACL string.
        acl: String,
    },
    /// DEACTIVATE at `location`.
    Deactivate {
        /// `server!partition`.
        location: String,
    },
    /// DELETE.
    Delete,
    /// FIND.
    Find,
}

impl Op {
    /// Whether the operation can change the state.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Find)
    }
}

/// A mailbox as a FIND shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// `server!partition`.
    pub location: String,
    /// ACL (empty for a reservation).
    pub acl: String,
    /// Active (`MAILBOX`) or reserved (`RESERVE`).
    pub active: bool,
}

/// What an `ok` completion returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Value {
    /// A write was applied (`OK`).
    Done,
    /// A write was refused by the registry's rules (`NO` with one of the
    /// model's reasons, e.g. "mailbox already exists"): no effect.
    Refused {
        /// The server's text.
        reason: String,
    },
    /// A FIND's answer.
    Found {
        /// The entry, or `None` if the mailbox does not exist.
        entry: Option<Entry>,
    },
}

/// One client event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    /// The client (one operation in flight at a time per process).
    pub process: u64,
    /// Invoke or a completion.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The mailbox.
    pub mailbox: String,
    /// The node (or replica) the client talked to, e.g. `n1` or `r1`.
    pub node: String,
    /// The operation (repeated in the completion).
    #[serde(flatten)]
    pub op: Op,
    /// On `ok`: what the server answered.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<Value>,
    /// On `fail`/`info`: why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// A nemesis action: a fault starts or ends.
///
/// A start is recorded once the fault is in force, a stop just before it
/// is healed, so that everything between them happened under the fault.
/// A start also says what the fault should do, so that the run can check
/// it did (see [`crate::evidence`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    /// Nanoseconds since the run started.
    pub time_ns: u64,
    /// `start` or `stop`.
    pub phase: String,
    /// The fault: `partition-halves`, `partition-leader`, `partition-ring`,
    /// `partition-bridge`, `partition-clients`, `kill`, `pause`,
    /// `membership`.
    pub fault: String,
    /// Which nodes, which rules.
    pub detail: String,
    /// On a start: the masters that must not answer: cut off from a
    /// majority of the masters (partition), killed or paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated: Vec<String>,
    /// On a partition's start: the masters on the side that can still
    /// elect a leader (a majority that all reach each other), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub majority: Vec<String>,
    /// On a start: the processes the clients cannot reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// On a start: the master that led just before, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// One line of a history file: a client event or a nemesis event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A client event.
    Client(Event),
    /// A nemesis event.
    Nemesis(NemesisEvent),
}
