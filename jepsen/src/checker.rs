//! The checker: is a recorded history consistent with a linearizable
//! registry, and do the other safety properties hold?
//!
//! * [`check_linearizable`]: every mailbox's operations, as seen by the
//!   masters, can be put in one order that respects real time and in which
//!   each acknowledged result is what the registry's model (Cyrus 3.6's
//!   MUPDATE master, below) answers. Mailboxes are independent keys, so each
//!   one is checked alone (P-compositionality, on a few threads) with a
//!   Wing–Gong–Lowe search memoized like Porcupine's, iterative and bounded
//!   by a [`Budget`]; a mailbox whose search runs out of budget is reported
//!   as unknown, never as valid. A relaxed search, in which unknown writes
//!   are never used up, runs first: when even it finds no linearization the
//!   history is refuted cheaply, however many unknown writes it has.
//! * [`check_final_state`]: the state read from the masters after the run
//!   (every fault healed) is explained by the history: no acknowledged write
//!   is lost, nothing appears that no write produced.
//! * [`check_ownership`]: at most one backend is ever granted a mailbox.
//! * [`check_monotonic_replica_reads`]: a replica never goes back in time.
//! * [`check_convergence`]: every replica ends with the masters' state.
//! * [`check_all`]: all of them, as one [`Verdict`].
//!
//! # The model
//!
//! A mailbox is absent, or `(location, acl, active)`:
//!
//! | operation | before | result | after |
//! |---|---|---|---|
//! | RESERVE l | absent | done | reserved at l, ACL "" |
//! | RESERVE l | present at l | done | reserved at l, ACL "" |
//! | RESERVE l | present elsewhere | "already exists" | unchanged |
//! | ACTIVATE l a | any | done | active at l with ACL a |
//! | DEACTIVATE l | active | done | reserved at l, ACL kept |
//! | DEACTIVATE l | reserved | "not currently active" | unchanged |
//! | DEACTIVATE l | absent | "doesn't exist" | unchanged |
//! | DELETE | present | done | absent |
//! | DELETE | absent | "doesn't exist" | unchanged |
//! | FIND | any | the state | unchanged |
//!
//! A refusal is compared by kind (its text is matched loosely), and a FIND
//! of a reservation may show an empty ACL whatever ACL the registry keeps
//! (a `RESERVE` line carries none).
//!
//! # How operations count
//!
//! An invocation is paired with the next completion of the same process.
//! An `ok` operation happened, between its invocation and its completion,
//! with the recorded result. A `fail` operation never happened and is
//! dropped. An `info` operation, or an invocation that never completed,
//! may have happened at any point after its invocation (even after every
//! other operation), or never, with any result: an unknown FIND is dropped.
//! Times are positions in the event slice, which is in time order.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::history::{Entry, Event, EventType, Op, Value};

/// Mailboxes by name, each absent (`None`) or as a FIND would show it.
///
/// As a final state, the map lists every mailbox that exists: a name the
/// map does not have is taken as absent (so a LIST of the whole registry is
/// a valid final state).
pub type State = BTreeMap<String, Option<Entry>>;

/// The names of the checks, as [`Anomaly::check`] carries them.
pub mod checks {
    /// A mailbox's history has no linearization.
    pub const LINEARIZABILITY: &str = "linearizability";
    /// The final state is not explained by the history (e.g. a lost
    /// acknowledged write).
    pub const FINAL_STATE: &str = "final-state";
    /// Two backends were granted the same mailbox.
    pub const OWNERSHIP: &str = "ownership";
    /// A replica read went back in time, or showed something never written.
    pub const REPLICA_READS: &str = "replica-reads";
    /// A replica's final state differs from the masters'.
    pub const CONVERGENCE: &str = "convergence";
    /// The history itself is malformed (a harness bug).
    pub const HISTORY: &str = "history";
    /// An acknowledged ACTIVATE followed by a FIND that shows a reservation
    /// with no RESERVE or DEACTIVATE that could fall between (what a
    /// duplicated RESERVE applied after the ACTIVATE would show).
    pub const RESURRECTED: &str = "resurrected-reservation";
}

/// Anomalies of one kind reported per mailbox and node before the rest are
/// summed up in one more anomaly.
const MAX_REPORTED: usize = 20;

/// One violation found by a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Which check: one of [`checks`].
    pub check: String,
    /// The mailbox concerned, if one is.
    pub mailbox: Option<String>,
    /// What is wrong, for humans.
    pub message: String,
    /// Indices into the checked event slice of the events involved, in
    /// order.
    pub events: Vec<usize>,
}

impl Anomaly {
    fn new(check: &str, mailbox: Option<&str>, message: String, mut events: Vec<usize>) -> Anomaly {
        events.sort_unstable();
        events.dedup();
        Anomaly {
            check: check.to_owned(),
            mailbox: mailbox.map(str::to_owned),
            message,
            events,
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// No anomaly and no unknown mailbox.
    pub valid: bool,
    /// Mailboxes whose linearizability was searched.
    pub checked_mailboxes: usize,
    /// Client operations (invocations) the checks looked at.
    pub operations: usize,
    /// Mailboxes whose search ran out of [`Budget`]: neither proved
    /// linearizable nor refuted.
    pub unknown: Vec<String>,
    /// Everything found wrong.
    pub anomalies: Vec<Anomaly>,
}

impl Verdict {
    fn finish(mut self) -> Verdict {
        self.unknown.sort();
        self.unknown.dedup();
        self.valid = self.anomalies.is_empty() && self.unknown.is_empty();
        self
    }
}

/// How much search one mailbox may cost before its verdict is unknown (each
/// of the two searches, relaxed and exact, gets the whole budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Distinct search states (a set of linearized operations and a model
    /// state) explored per mailbox. Each costs about 100 to 200 bytes of
    /// memory until the mailbox is done, and as many mailboxes as cores are
    /// searched at once.
    pub max_states: u64,
    /// Wall-clock time per mailbox, if limited.
    pub max_time: Option<Duration>,
}

impl Default for Budget {
    /// One million states or 30 seconds per mailbox.
    fn default() -> Budget {
        Budget {
            max_states: 1_000_000,
            max_time: Some(Duration::from_secs(30)),
        }
    }
}

/// Whether a server's `NO` text is one of the model's refusals (a definite
/// outcome of a write), as opposed to unavailability (an unknown one).
pub fn is_model_refusal(reason: &str) -> bool {
    !matches!(Refusal::classify(reason), Refusal::Unrecognized)
}

/// States read at the end of a run, after every fault healed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalStates {
    /// The masters' state, read linearizably (e.g. a LIST on the leader).
    pub masters: Option<State>,
    /// Each replica's state, by replica name.
    pub replicas: BTreeMap<String, State>,
}

/// Runs every check with the default [`Budget`]: linearizability of the
/// masters' history (with the final state, if read), ownership, monotonic
/// replica reads and, if the masters' final state is known, convergence of
/// every replica.
pub fn check_all(events: &[Event], finals: &FinalStates) -> Verdict {
    check_all_with(events, finals, &Budget::default())
}

/// [`check_all`] with a given search budget.
pub fn check_all_with(events: &[Event], finals: &FinalStates, budget: &Budget) -> Verdict {
    let mut verdict = check_linearizable_with(events, finals.masters.as_ref(), budget);
    verdict.operations = events
        .iter()
        .filter(|e| e.kind == EventType::Invoke)
        .count();
    verdict.anomalies.extend(check_ownership(events));
    verdict
        .anomalies
        .extend(check_resurrected_reservations(events));
    verdict
        .anomalies
        .extend(check_monotonic_replica_reads(events));
    if let Some(masters) = &finals.masters {
        verdict
            .anomalies
            .extend(check_convergence(masters, &finals.replicas));
    }
    verdict.finish()
}

/// Checks that every mailbox's history on the masters is linearizable with
/// the default [`Budget`] and, if `final_state` is given, that the history
/// explains it (see [`check_final_state`]).
///
/// Operations sent to a replica (`node` starting with `r`) are left out,
/// except writes: a replica passes them on to a master. Malformed histories
/// (a completion without invocation, a completion that does not match its
/// invocation) are reported as [`checks::HISTORY`] anomalies.
pub fn check_linearizable(events: &[Event], final_state: Option<&State>) -> Verdict {
    check_linearizable_with(events, final_state, &Budget::default())
}

/// [`check_linearizable`] with a given search budget.
pub fn check_linearizable_with(
    events: &[Event],
    final_state: Option<&State>,
    budget: &Budget,
) -> Verdict {
    run_keys(events, final_state, budget, Mode::Linearizability)
}

/// Checks that `final_state` (every mailbox that exists, read from the
/// masters after the run) is explained by the history, with the default
/// [`Budget`]: the final read is appended as a FIND that begins after every
/// other operation completed, and the mailbox's history must stay
/// linearizable. A lost acknowledged write, or a mailbox that no write
/// could have produced, are [`checks::FINAL_STATE`] anomalies. A mailbox whose history itself is not
/// linearizable cannot be explained either and is reported too.
pub fn check_final_state(events: &[Event], final_state: &State) -> Verdict {
    check_final_state_with(events, final_state, &Budget::default())
}

/// [`check_final_state`] with a given search budget.
pub fn check_final_state_with(events: &[Event], final_state: &State, budget: &Budget) -> Verdict {
    run_keys(events, Some(final_state), budget, Mode::FinalStateOnly)
}

/// Checks that no two backends were ever granted the same mailbox: two `ok`
/// RESERVEs answered `OK` at different locations, with no DELETE of the
/// mailbox that may have taken effect (answered `OK`, or unknown) able to
/// fall between them.
///
/// The ownership workload only RESERVEs and FINDs, so there a second grant
/// is always an anomaly. A mailbox that was (possibly) ACTIVATEd or
/// DEACTIVATEd is skipped: those move a mailbox legitimately, and
/// [`check_linearizable`] covers it.
pub fn check_ownership(events: &[Event]) -> Vec<Anomaly> {
    let (ops, _) = pair(events);
    let mut anomalies = Vec::new();
    for (mailbox, ops) in by_mailbox(&ops, |_| true) {
        let moves = ops.iter().any(|o| {
            matches!(o.inv.op, Op::Activate { .. } | Op::Deactivate { .. }) && o.may_have_effect()
        });
        if moves {
            continue;
        }
        let grants: Vec<&Operation> = ops
            .iter()
            .copied()
            .filter(|o| {
                matches!(o.inv.op, Op::Reserve { .. })
                    && matches!(o.status, Status::Ok(Value::Done))
            })
            .collect();
        let deletes: Vec<&Operation> = ops
            .iter()
            .copied()
            .filter(|o| matches!(o.inv.op, Op::Delete) && o.may_have_effect())
            .collect();
        let location = |o: &Operation| match &o.inv.op {
            Op::Reserve { location } => location.clone(),
            _ => String::new(),
        };
        let mut conflicts = Vec::new();
        for (i, a) in grants.iter().enumerate() {
            for b in &grants[i + 1..] {
                if location(a) == location(b) {
                    continue;
                }
                let separated = deletes
                    .iter()
                    .any(|d| may_fall_between(a, d, b) || may_fall_between(b, d, a));
                if !separated {
                    conflicts.push((*a, *b));
                }
            }
        }
        let Some((a, b)) = conflicts.first() else {
            continue;
        };
        let mut involved: Vec<&Operation> = conflicts.iter().flat_map(|(a, b)| [*a, *b]).collect();
        involved.sort_by_key(|o| o.invoke);
        involved.dedup_by_key(|o| o.invoke);
        let events = involved.iter().flat_map(|o| o.indices()).collect();
        anomalies.push(Anomaly::new(
            checks::OWNERSHIP,
            Some(mailbox),
            format!(
                "double owner: {} and {} were both granted the reservation, and no deletion \
                 can fall between them ({} conflicting pair(s), {} grant(s) in all)",
                describe(a),
                describe(b),
                conflicts.len(),
                involved.len(),
            ),
            events,
        ));
    }
    anomalies
}

/// Finds acknowledged ACTIVATEs that a later FIND on a master shows as a
/// reservation when no RESERVE or DEACTIVATE may fall between them: a
/// write applied twice (a retried RESERVE landing after the client's
/// ACTIVATE) looks exactly like this. Linearizability catches it too; this
/// names it.
pub fn check_resurrected_reservations(events: &[Event]) -> Vec<Anomaly> {
    let (ops, _) = pair(events);
    let mut anomalies = Vec::new();
    for (mailbox, ops) in by_mailbox(&ops, |o| !o.inv.node.starts_with('r')) {
        let activates = ops.iter().copied().filter(|o| {
            matches!(o.inv.op, Op::Activate { .. }) && matches!(o.status, Status::Ok(Value::Done))
        });
        let demoters: Vec<&Operation> = ops
            .iter()
            .copied()
            .filter(|o| {
                matches!(o.inv.op, Op::Reserve { .. } | Op::Deactivate { .. })
                    && o.may_have_effect()
            })
            .collect();
        'activate: for a in activates {
            for f in ops.iter().copied().filter(|f| {
                matches!(f.inv.op, Op::Find)
                    && f.invoke > a.end()
                    && matches!(f.status, Status::Ok(Value::Found { entry: Some(e) }) if !e.active)
            }) {
                if demoters.iter().any(|r| may_fall_between(a, r, f)) {
                    continue;
                }
                let mut involved = a.indices();
                involved.extend(f.indices());
                anomalies.push(Anomaly::new(
                    checks::RESURRECTED,
                    Some(mailbox),
                    format!(
                        "{} was acknowledged, then {} showed a reservation, and no RESERVE or \
                         DEACTIVATE can fall between them",
                        describe(a),
                        describe(f)
                    ),
                    involved,
                ));
                if anomalies.len() >= MAX_REPORTED {
                    return anomalies;
                }
                continue 'activate;
            }
        }
    }
    anomalies
}

/// Checks the reads of the replicas workload: one writer per mailbox
/// ACTIVATEs it with ACL `v1`, `v2`, `v3`… each after the previous one
/// completed, and readers FIND it on replicas (`node` starting with `r`).
///
/// For each replica and mailbox, a read that begins after another read
/// completed must not show an older version (absent counts as version 0),
/// unless the older version's write is of unknown outcome (it may have taken
/// effect late). Every read must show a version some write produced (not
/// one that certainly failed, nor one not yet invoked when the read
/// completed). Mailboxes whose writes do not have that shape are skipped.
pub fn check_monotonic_replica_reads(events: &[Event]) -> Vec<Anomaly> {
    let (ops, _) = pair(events);
    let mut anomalies = Vec::new();
    for (mailbox, ops) in by_mailbox(&ops, |_| true) {
        let reads: Vec<(&Operation, Option<&Entry>)> = ops
            .iter()
            .filter(|o| is_replica(&o.inv.node))
            .filter_map(|o| match o.status {
                Status::Ok(Value::Found { entry }) => Some((*o, entry.as_ref())),
                _ => None,
            })
            .collect();
        if reads.is_empty() {
            continue;
        }
        let Some(writes) = versioned_writes(&ops) else {
            continue;
        };
        // Reads that show something no write produced.
        let mut produced = Vec::new();
        for (read, entry) in &reads {
            let Some(entry) = entry else { continue };
            let write = version_of(Some(entry)).and_then(|v| writes.get(&v));
            let explained = write.is_some_and(|w| {
                let Op::Activate { location, acl } = &w.inv.op else {
                    return false;
                };
                entry.active
                    && entry.location == *location
                    && entry.acl == *acl
                    && !matches!(w.status, Status::Fail)
                    && w.invoke < read.complete.unwrap_or(usize::MAX)
            });
            if !explained {
                let mut involved = read.indices();
                if let Some(w) = write {
                    involved.extend(w.indices());
                }
                produced.push(Anomaly::new(
                    checks::REPLICA_READS,
                    Some(mailbox),
                    format!(
                        "{} shows {} which no write produced (by then)",
                        describe(read),
                        describe_entry(Some(entry)),
                    ),
                    involved,
                ));
            }
        }
        push_capped(
            &mut anomalies,
            produced,
            mailbox,
            "unexplained replica reads",
        );
        // Monotonicity, per replica.
        let mut nodes: BTreeMap<&str, Vec<(&Operation, u64)>> = BTreeMap::new();
        for (read, entry) in &reads {
            if entry.is_some() && version_of(*entry).is_none() {
                continue; // reported above
            }
            let v = version_of(*entry).unwrap_or(0);
            nodes.entry(&read.inv.node).or_default().push((*read, v));
        }
        for (node, reads) in nodes {
            let mut by_completion = reads.clone();
            by_completion.sort_by_key(|(o, _)| o.complete);
            let mut by_invocation = reads;
            by_invocation.sort_by_key(|(o, _)| o.invoke);
            let mut newest: Option<(&Operation, u64)> = None;
            let mut p = 0;
            let mut found = Vec::new();
            for (b, vb) in by_invocation {
                while p < by_completion.len()
                    && by_completion[p].0.complete.is_some_and(|c| c < b.invoke)
                {
                    if newest.is_none_or(|(_, v)| by_completion[p].1 > v) {
                        newest = Some(by_completion[p]);
                    }
                    p += 1;
                }
                let Some((a, va)) = newest else { continue };
                if vb >= va {
                    continue;
                }
                let late_write_possible = vb > 0
                    && writes
                        .get(&vb)
                        .is_some_and(|w| matches!(w.status, Status::Unknown | Status::Pending));
                if late_write_possible {
                    continue;
                }
                let mut involved = a.indices();
                involved.extend(b.indices());
                found.push(Anomaly::new(
                    checks::REPLICA_READS,
                    Some(mailbox),
                    format!(
                        "replica {node} went back in time: {} saw version {va}, then {}, \
                         invoked after it completed, saw version {vb}",
                        describe(a),
                        describe(b),
                    ),
                    involved,
                ));
            }
            push_capped(
                &mut anomalies,
                found,
                mailbox,
                &format!("non-monotonic reads on replica {node}"),
            );
        }
    }
    anomalies
}

/// Compares every replica's final state with the masters': a mailbox one
/// side has and the other lacks, or shows differently, is an anomaly.
pub fn check_convergence(masters: &State, replicas: &BTreeMap<String, State>) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    for (replica, state) in replicas {
        let mut names: Vec<&String> = masters.keys().chain(state.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let m = masters.get(name).and_then(Option::as_ref);
            let r = state.get(name).and_then(Option::as_ref);
            if m != r {
                anomalies.push(Anomaly::new(
                    checks::CONVERGENCE,
                    Some(name),
                    format!(
                        "replica {replica} ends with {}, the masters with {}",
                        describe_entry(r),
                        describe_entry(m),
                    ),
                    Vec::new(),
                ));
            }
        }
    }
    anomalies
}

// ---------------------------------------------------------------------------
// Operations: invocations paired with completions.

/// How an operation completed.
#[derive(Debug, Clone, Copy)]
enum Status<'a> {
    /// Answered, with a value of the right shape for the operation.
    Ok(&'a Value),
    /// Certainly no effect.
    Fail,
    /// Unknown (an `info` completion, or a malformed `ok` one).
    Unknown,
    /// Never completed.
    Pending,
}

/// One client operation.
#[derive(Debug, Clone, Copy)]
struct Operation<'a> {
    /// Index of the invocation.
    invoke: usize,
    /// Index of the completion, if any.
    complete: Option<usize>,
    /// The invocation.
    inv: &'a Event,
    status: Status<'a>,
}

impl Operation<'_> {
    /// Whether the operation may have changed the state.
    fn may_have_effect(&self) -> bool {
        match self.status {
            Status::Fail => false,
            Status::Ok(v) => matches!(v, Value::Done),
            Status::Unknown | Status::Pending => self.inv.op.is_write(),
        }
    }

    /// Invocation and completion indices.
    fn indices(&self) -> Vec<usize> {
        std::iter::once(self.invoke).chain(self.complete).collect()
    }

    /// Completion time, `usize::MAX` if unknown (it may take effect at any
    /// time after its invocation).
    fn end(&self) -> usize {
        match self.status {
            Status::Ok(_) | Status::Fail => self.complete.unwrap_or(usize::MAX),
            Status::Unknown | Status::Pending => usize::MAX,
        }
    }
}

fn is_replica(node: &str) -> bool {
    node.starts_with('r')
}

/// Pairs invocations with completions, in invocation order; malformed
/// histories give [`checks::HISTORY`] anomalies.
fn pair(events: &[Event]) -> (Vec<Operation<'_>>, Vec<Anomaly>) {
    let mut ops: Vec<Operation> = Vec::new();
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut anomalies = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if e.kind == EventType::Invoke {
            if let Some(previous) = in_flight.insert(e.process, ops.len()) {
                anomalies.push(Anomaly::new(
                    checks::HISTORY,
                    Some(&e.mailbox),
                    format!(
                        "process {} invoked a new operation while the one invoked at event {} \
                         was in flight (that one is taken as unknown)",
                        e.process, ops[previous].invoke
                    ),
                    vec![ops[previous].invoke, i],
                ));
            }
            ops.push(Operation {
                invoke: i,
                complete: None,
                inv: e,
                status: Status::Pending,
            });
            continue;
        }
        let Some(o) = in_flight.remove(&e.process) else {
            anomalies.push(Anomaly::new(
                checks::HISTORY,
                Some(&e.mailbox),
                format!("completion of process {} without an invocation", e.process),
                vec![i],
            ));
            continue;
        };
        let op = &mut ops[o];
        op.complete = Some(i);
        if e.mailbox != op.inv.mailbox || e.op != op.inv.op {
            anomalies.push(Anomaly::new(
                checks::HISTORY,
                Some(&op.inv.mailbox),
                format!(
                    "completion of process {} does not match its invocation (taken as unknown)",
                    e.process
                ),
                vec![op.invoke, i],
            ));
            op.status = Status::Unknown;
            continue;
        }
        op.status = match e.kind {
            EventType::Fail => Status::Fail,
            EventType::Info => Status::Unknown,
            EventType::Ok => match (&e.value, &e.op) {
                (Some(v @ Value::Found { .. }), Op::Find) => Status::Ok(v),
                (Some(v @ (Value::Done | Value::Refused { .. })), w) if w.is_write() => {
                    Status::Ok(v)
                }
                _ => {
                    anomalies.push(Anomaly::new(
                        checks::HISTORY,
                        Some(&e.mailbox),
                        format!(
                            "ok completion of process {} with no value of the operation's kind \
                             (taken as unknown)",
                            e.process
                        ),
                        vec![op.invoke, i],
                    ));
                    Status::Unknown
                }
            },
            EventType::Invoke => unreachable!("handled above"),
        };
    }
    (ops, anomalies)
}

/// Operations grouped by mailbox, in invocation order.
fn by_mailbox<'o, 'a>(
    ops: &'o [Operation<'a>],
    keep: impl Fn(&Operation) -> bool,
) -> BTreeMap<&'a str, Vec<&'o Operation<'a>>> {
    let mut map: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for o in ops.iter().filter(|o| keep(o)) {
        map.entry(o.inv.mailbox.as_str()).or_default().push(o);
    }
    map
}

/// Whether `d` may take effect after `a` and before `b`.
fn may_fall_between(a: &Operation, d: &Operation, b: &Operation) -> bool {
    // Some ta < td < tb with each within its operation's interval.
    a.invoke.max(d.invoke) < b.end().min(d.end()) && a.invoke < b.end()
}

/// The writes of a replicas-workload mailbox, by version: `None` if the
/// mailbox's writes are not one writer's ACTIVATEs of increasing versions.
fn versioned_writes<'o, 'a>(ops: &[&'o Operation<'a>]) -> Option<BTreeMap<u64, &'o Operation<'a>>> {
    let mut writes = BTreeMap::new();
    let mut previous: Option<(&Operation, u64)> = None;
    for o in ops.iter().copied().filter(|o| o.inv.op.is_write()) {
        let Op::Activate { acl, .. } = &o.inv.op else {
            return None;
        };
        let v = version(acl).filter(|v| *v > 0)?;
        if let Some((p, pv)) = previous {
            if v <= pv || p.complete.is_none_or(|c| c > o.invoke) {
                return None;
            }
        }
        previous = Some((o, v));
        writes.insert(v, o);
    }
    Some(writes)
}

fn version(acl: &str) -> Option<u64> {
    acl.strip_prefix('v')?.parse().ok()
}

/// The version an entry shows: 0 if absent, `None` if not a version.
fn version_of(entry: Option<&Entry>) -> Option<u64> {
    match entry {
        None => Some(0),
        Some(e) => version(&e.acl).filter(|v| *v > 0),
    }
}

fn push_capped(anomalies: &mut Vec<Anomaly>, found: Vec<Anomaly>, mailbox: &str, what: &str) {
    let more = found.len().saturating_sub(MAX_REPORTED);
    let check = found.first().map(|a| a.check.clone());
    anomalies.extend(found.into_iter().take(MAX_REPORTED));
    if let (Some(check), true) = (check, more > 0) {
        anomalies.push(Anomaly::new(
            &check,
            Some(mailbox),
            format!("{more} more {what} not listed"),
            Vec::new(),
        ));
    }
}

// ---------------------------------------------------------------------------
// Descriptions.

fn describe_op(op: &Op) -> String {
    match op {
        Op::Reserve { location } => format!("RESERVE {location}"),
        Op::Activate { location, acl } => format!("ACTIVATE {location} {acl:?}"),
        Op::Deactivate { location } => format!("DEACTIVATE {location}"),
        Op::Delete => "DELETE".to_owned(),
        Op::Find => "FIND".to_owned(),
    }
}

fn describe_entry(entry: Option<&Entry>) -> String {
    match entry {
        None => "absent".to_owned(),
        Some(e) if e.active => format!("active at {} with ACL {:?}", e.location, e.acl),
        Some(e) if e.acl.is_empty() => format!("reserved at {}", e.location),
        Some(e) => format!("reserved at {} (ACL {:?})", e.location, e.acl),
    }
}

fn describe_status(status: Status) -> String {
    match status {
        Status::Ok(Value::Done) => "OK".to_owned(),
        Status::Ok(Value::Refused { reason }) => format!("NO {reason:?}"),
        Status::Ok(Value::Found { entry }) => format!("found {}", describe_entry(entry.as_ref())),
        Status::Fail => "failed".to_owned(),
        Status::Unknown => "unknown".to_owned(),
        Status::Pending => "never completed".to_owned(),
    }
}

/// `process 3 on n1: RESERVE be1!default → OK (events 4..9)`.
fn describe(o: &Operation) -> String {
    let span = match o.complete {
        Some(c) => format!("events {}..{}", o.invoke, c),
        None => format!("event {}", o.invoke),
    };
    format!(
        "process {} on {}: {} → {} ({span})",
        o.inv.process,
        o.inv.node,
        describe_op(&o.inv.op),
        describe_status(o.status),
    )
}

// ---------------------------------------------------------------------------
// Linearizability, per mailbox.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Report the history's violations as linearizability anomalies and the
    /// final state's as final-state anomalies.
    Linearizability,
    /// Report only whether the final state is explained.
    FinalStateOnly,
}

/// What one mailbox's search found.
enum KeyResult {
    Linearizable,
    Violation(Failure),
    Unknown,
}

fn run_keys(events: &[Event], final_state: Option<&State>, budget: &Budget, mode: Mode) -> Verdict {
    let (ops, history_anomalies) = pair(events);
    let keys = by_mailbox(&ops, |o| !is_replica(&o.inv.node) || o.inv.op.is_write());
    let operations = keys.values().map(Vec::len).sum();
    let mut names: Vec<&str> = keys.keys().copied().collect();
    if let Some(f) = final_state {
        names.extend(f.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
    }
    let empty = Vec::new();
    let jobs: Vec<(&str, &Vec<&Operation>)> = names
        .iter()
        .map(|n| (*n, keys.get(n).unwrap_or(&empty)))
        .collect();
    let results = parallel_map(&jobs, |(name, ops)| {
        let mut final_failure = None;
        if let Some(f) = final_state {
            let entry = f.get(*name).and_then(Option::as_ref);
            let h = KeyHistory::build(ops, events.len(), Some(entry));
            match check_key(&h, budget) {
                KeyResult::Linearizable => return (Described::Linearizable, None),
                KeyResult::Unknown => return (Described::Unknown, None),
                KeyResult::Violation(f) => final_failure = Some(h.describe(&f)),
            }
        }
        let h = KeyHistory::build(ops, events.len(), None);
        let alone = match check_key(&h, budget) {
            KeyResult::Linearizable => Described::Linearizable,
            KeyResult::Unknown => Described::Unknown,
            KeyResult::Violation(f) => {
                let (message, events) = h.describe(&f);
                Described::Violation(message, events)
            }
        };
        (alone, final_failure)
    });
    let mut verdict = Verdict {
        checked_mailboxes: jobs.len(),
        operations,
        ..Verdict::default()
    };
    if mode == Mode::Linearizability {
        verdict.anomalies = history_anomalies;
    }
    for ((name, _), (alone, final_failure)) in jobs.iter().zip(results) {
        let name = *name;
        match (alone, final_failure) {
            (Described::Unknown, _) => verdict.unknown.push(name.to_owned()),
            (Described::Linearizable, None) => {}
            (Described::Linearizable, Some((message, events))) => {
                verdict.anomalies.push(Anomaly::new(
                    checks::FINAL_STATE,
                    Some(name),
                    format!("the final state is not explained by the history: {message}"),
                    events,
                ));
            }
            (Described::Violation(message, events), _) => {
                let anomaly = match mode {
                    Mode::Linearizability => Anomaly::new(
                        checks::LINEARIZABILITY,
                        Some(name),
                        format!("not linearizable: {message}"),
                        events,
                    ),
                    Mode::FinalStateOnly => Anomaly::new(
                        checks::FINAL_STATE,
                        Some(name),
                        format!(
                            "no final state is explained: the history itself is not \
                             linearizable: {message}"
                        ),
                        events,
                    ),
                };
                verdict.anomalies.push(anomaly);
            }
        }
    }
    verdict.finish()
}

/// A mailbox's result, with a violation put into words.
enum Described {
    Linearizable,
    Violation(String, Vec<usize>),
    Unknown,
}

/// Runs `f` on every item over a few threads; results in item order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was processed"))
        .collect()
}

// --- The model, on interned strings. ---------------------------------------

const ID_MASK: u64 = (1 << 31) - 1;

/// One mailbox's state, packed: 0 is absent; otherwise bit 63 is set, bit 62
/// is `active`, bits 31..62 the location's id and bits 0..31 the ACL's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MState(u64);

impl MState {
    const ABSENT: MState = MState(0);

    fn present(location: u32, acl: u32, active: bool) -> MState {
        MState(
            (1 << 63)
                | (u64::from(active) << 62)
                | ((u64::from(location) & ID_MASK) << 31)
                | (u64::from(acl) & ID_MASK),
        )
    }

    fn is_present(self) -> bool {
        self.0 >> 63 == 1
    }

    fn active(self) -> bool {
        (self.0 >> 62) & 1 == 1
    }

    fn location(self) -> u32 {
        ((self.0 >> 31) & ID_MASK) as u32
    }

    fn acl(self) -> u32 {
        (self.0 & ID_MASK) as u32
    }
}

/// The id of the empty string.
const EMPTY: u32 = 0;

/// Strings of one mailbox's history, as small ids.
struct Strings {
    list: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings {
            list: Vec::new(),
            ids: HashMap::new(),
        };
        s.id("");
        s
    }

    fn id(&mut self, text: &str) -> u32 {
        if let Some(id) = self.ids.get(text) {
            return *id;
        }
        let id = u32::try_from(self.list.len())
            .ok()
            .filter(|id| u64::from(*id) <= ID_MASK)
            .expect("fewer than 2^31 distinct strings per mailbox");
        self.list.push(text.to_owned());
        self.ids.insert(text.to_owned(), id);
        id
    }

    fn op(&mut self, op: &Op) -> MOp {
        match op {
            Op::Reserve { location } => MOp::Reserve(self.id(location)),
            Op::Activate { location, acl } => MOp::Activate(self.id(location), self.id(acl)),
            Op::Deactivate { location } => MOp::Deactivate(self.id(location)),
            Op::Delete => MOp::Delete,
            Op::Find => MOp::Find,
        }
    }

    fn state(&mut self, entry: Option<&Entry>) -> MState {
        match entry {
            None => MState::ABSENT,
            Some(e) => MState::present(self.id(&e.location), self.id(&e.acl), e.active),
        }
    }

    fn show(&self, s: MState) -> String {
        if !s.is_present() {
            return "absent".to_owned();
        }
        describe_entry(Some(&Entry {
            location: self.list[s.location() as usize].clone(),
            acl: self.list[s.acl() as usize].clone(),
            active: s.active(),
        }))
    }
}

/// An operation on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum MOp {
    Reserve(u32),
    Activate(u32, u32),
    Deactivate(u32),
    Delete,
    Find,
}

/// Why the model refuses a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    AlreadyExists,
    NotActive,
    DoesNotExist,
    /// A text that is none of the model's refusals: no state explains it.
    Unrecognized,
}

impl Refusal {
    /// The refusal a server's text means: exactly one of the texts the
    /// registry's own model answers with. A loose match would let a future
    /// "unavailable: … does not exist" be taken as a definite refusal.
    fn classify(reason: &str) -> Refusal {
        use corvid_registry::model::Refusal as Server;
        let is = |r: Server| reason == r.to_string();
        if is(Server::AlreadyExists) {
            Refusal::AlreadyExists
        } else if is(Server::NotActive) {
            Refusal::NotActive
        } else if is(Server::DoesNotExist) {
            Refusal::DoesNotExist
        } else {
            Refusal::Unrecognized
        }
    }
}

/// What the model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Refused(Refusal),
    Found(MState),
}

/// What a recorded completion requires of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Unknown outcome: anything.
    Any,
    Done,
    Refused(Refusal),
    /// A FIND that showed this (a reservation's ACL may show empty).
    Found(MState),
}

impl Expect {
    /// An answer that no state changes on: a FIND's or a refusal.
    fn read_only(self) -> bool {
        matches!(self, Expect::Found(_) | Expect::Refused(_))
    }

    fn accepts(self, outcome: Outcome) -> bool {
        match (self, outcome) {
            (Expect::Any, _) | (Expect::Done, Outcome::Done) => true,
            (Expect::Refused(a), Outcome::Refused(b)) => a == b && a != Refusal::Unrecognized,
            (Expect::Found(seen), Outcome::Found(s)) => {
                seen == s
                    || (seen.is_present()
                        && s.is_present()
                        && !seen.active()
                        && !s.active()
                        && seen.location() == s.location()
                        && seen.acl() == EMPTY)
            }
            _ => false,
        }
    }
}

/// The registry's rules: the answer to `op` in state `s`, and the state
/// after it.
fn step(s: MState, op: MOp) -> (Outcome, MState) {
    match op {
        MOp::Reserve(l) => {
            if !s.is_present() || s.location() == l {
                (Outcome::Done, MState::present(l, EMPTY, false))
            } else {
                (Outcome::Refused(Refusal::AlreadyExists), s)
            }
        }
        MOp::Activate(l, a) => (Outcome::Done, MState::present(l, a, true)),
        MOp::Deactivate(l) => {
            if !s.is_present() {
                (Outcome::Refused(Refusal::DoesNotExist), s)
            } else if !s.active() {
                (Outcome::Refused(Refusal::NotActive), s)
            } else {
                (Outcome::Done, MState::present(l, s.acl(), false))
            }
        }
        MOp::Delete => {
            if s.is_present() {
                (Outcome::Done, MState::ABSENT)
            } else {
                (Outcome::Refused(Refusal::DoesNotExist), s)
            }
        }
        MOp::Find => (Outcome::Found(s), s),
    }
}

// --- One mailbox's history, ready for the search. --------------------------

/// An operation of one mailbox.
struct KOp {
    op: MOp,
    expect: Expect,
    /// Unknown outcome: optional, effect at any time after the invocation.
    info: bool,
    /// Index among the `ok` operations, or among the `info` ones.
    slot: usize,
    /// For an `info` operation, its class: the `info` operations with the
    /// same `op`, which are interchangeable (an earlier one can do all a
    /// later one can).
    class: usize,
    /// When it was invoked (an event index).
    call: usize,
    /// Event indices; `None` for the final read.
    invoke: Option<usize>,
    complete: Option<usize>,
    /// The operation as recorded (`None` for the final read).
    source: Option<(u64, String, Op, String)>,
}

/// One mailbox's operations, ready for the search.
struct KeyHistory {
    ops: Vec<KOp>,
    strings: Strings,
    n_ok: usize,
    n_info: usize,
    /// The `info` operations of each class, in invocation order; classes in
    /// the order of their first invocation.
    classes: Vec<Vec<usize>>,
    /// The list of the `ok` operations' calls and returns, in time order:
    /// node 0 is the head, the last node the tail.
    node_op: Vec<u32>,
    node_is_return: Vec<bool>,
    node_time: Vec<usize>,
    call_node: Vec<u32>,
    return_node: Vec<u32>,
}

impl KeyHistory {
    fn build(
        ops: &[&Operation],
        n_events: usize,
        final_entry: Option<Option<&Entry>>,
    ) -> KeyHistory {
        let mut strings = Strings::new();
        let mut kops: Vec<KOp> = Vec::new();
        // (time, op index, is return), for ok operations
        let mut points: Vec<(usize, u32, bool)> = Vec::new();
        let (mut n_ok, mut n_info) = (0, 0);
        let mut class_of: HashMap<MOp, usize> = HashMap::new();
        let mut classes: Vec<Vec<usize>> = Vec::new();
        for o in ops {
            let op = strings.op(&o.inv.op);
            let expect = match o.status {
                Status::Fail => continue,
                Status::Unknown | Status::Pending if op == MOp::Find => continue,
                Status::Unknown | Status::Pending => Expect::Any,
                Status::Ok(Value::Done) => Expect::Done,
                Status::Ok(Value::Refused { reason }) => Expect::Refused(Refusal::classify(reason)),
                Status::Ok(Value::Found { entry }) => Expect::Found(strings.state(entry.as_ref())),
            };
            let i = kops.len();
            let info = expect == Expect::Any;
            let (slot, class) = if info {
                let class = *class_of.entry(op).or_insert_with(|| {
                    classes.push(Vec::new());
                    classes.len() - 1
                });
                classes[class].push(i);
                n_info += 1;
                (n_info - 1, class)
            } else {
                points.push((o.invoke, i as u32, false));
                points.push((o.complete.expect("ok operations complete"), i as u32, true));
                n_ok += 1;
                (n_ok - 1, usize::MAX)
            };
            kops.push(KOp {
                op,
                expect,
                info,
                slot,
                class,
                call: o.invoke,
                invoke: Some(o.invoke),
                complete: o.complete,
                source: Some((
                    o.inv.process,
                    o.inv.node.clone(),
                    o.inv.op.clone(),
                    describe_status(o.status),
                )),
            });
        }
        if let Some(entry) = final_entry {
            let i = kops.len() as u32;
            points.push((n_events, i, false));
            points.push((n_events + 1, i, true));
            kops.push(KOp {
                op: MOp::Find,
                expect: Expect::Found(strings.state(entry)),
                info: false,
                slot: n_ok,
                class: usize::MAX,
                call: n_events,
                invoke: None,
                complete: None,
                source: None,
            });
            n_ok += 1;
        }
        points.sort_unstable();
        let mut node_op = vec![u32::MAX];
        let mut node_is_return = vec![false];
        let mut node_time = vec![0];
        let mut call_node = vec![0; kops.len()];
        let mut return_node = vec![0; kops.len()];
        for (time, i, is_return) in points {
            let node = node_op.len() as u32;
            if is_return {
                return_node[i as usize] = node;
            } else {
                call_node[i as usize] = node;
            }
            node_op.push(i);
            node_is_return.push(is_return);
            node_time.push(time);
        }
        node_op.push(u32::MAX);
        node_is_return.push(false);
        node_time.push(usize::MAX);
        KeyHistory {
            ops: kops,
            strings,
            n_ok,
            n_info,
            classes,
            node_op,
            node_is_return,
            node_time,
            call_node,
            return_node,
        }
    }

    /// Puts a failure into words, with the event indices involved.
    fn describe(&self, f: &Failure) -> (String, Vec<usize>) {
        let mut events = Vec::new();
        let mut say = |i: usize| -> String {
            let k = &self.ops[i];
            events.extend(k.invoke);
            events.extend(k.complete);
            match &k.source {
                None => format!(
                    "the final read after the run, showing {}",
                    match k.expect {
                        Expect::Found(s) => self.strings.show(s),
                        _ => "?".to_owned(),
                    }
                ),
                Some((process, node, op, status)) => {
                    let span = match (k.invoke, k.complete) {
                        (Some(a), Some(b)) => format!("events {a}..{b}"),
                        (Some(a), None) => format!("event {a}"),
                        _ => String::new(),
                    };
                    format!(
                        "process {process} on {node}: {} → {status} ({span})",
                        describe_op(op)
                    )
                }
            }
        };
        let mut message = format!(
            "at most {} of its {} acknowledged operations can be ordered",
            f.linearized, self.n_ok
        );
        if let Some(b) = f.blocking {
            message.push_str(&format!(
                "; then {} cannot take effect: in the furthest ordering the mailbox is {}",
                say(b),
                self.strings.show(f.state),
            ));
        }
        if let Some(l) = f.last {
            message.push_str(&format!(", after {}", say(l)));
        }
        (message, events)
    }
}

// --- The search. -----------------------------------------------------------

/// The furthest dead end of a failed search.
struct Failure {
    /// `ok` operations linearized there.
    linearized: usize,
    /// The operation that had to be linearized next and could not be.
    blocking: Option<usize>,
    /// The model state there.
    state: MState,
    /// The operation linearized last.
    last: Option<usize>,
}

/// One step of the current linearization.
struct Frame {
    op: u32,
    /// The state before it.
    before: MState,
    /// Taken without alternatives (a matching operation that does not change
    /// the state): backtracking goes past it.
    forced: bool,
}

/// FxHash: fast, and good enough for bitsets.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for b in chunks.remainder() {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The sets of unknown operations linearized in the configurations seen
/// with one `ok` set and state; nearly always one (and empty: no
/// allocation).
enum InfoSets {
    None,
    One(Box<[u64]>),
    Many(Vec<Box<[u64]>>),
}

impl InfoSets {
    /// Whether a configuration seen had a subset of `info` (so as many
    /// options or more).
    fn dominates(&self, info: &[u64]) -> bool {
        match self {
            InfoSets::None => false,
            InfoSets::One(s) => is_subset(s, info),
            InfoSets::Many(v) => v.iter().any(|s| is_subset(s, info)),
        }
    }

    fn push(&mut self, info: &[u64]) {
        *self = match std::mem::replace(self, InfoSets::None) {
            InfoSets::None => InfoSets::One(info.into()),
            InfoSets::One(s) => InfoSets::Many(vec![s, info.into()]),
            InfoSets::Many(mut v) => {
                v.push(info.into());
                InfoSets::Many(v)
            }
        };
    }
}

fn bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] >> (i % 64) & 1 == 1
}

fn trimmed(bits: &[u64]) -> &[u64] {
    let end = bits.iter().rposition(|w| *w != 0).map_or(0, |p| p + 1);
    &bits[..end]
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.len() <= large.len() && small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

/// Whether a mailbox's history is linearizable: a relaxed search first, in
/// which unknown operations are never used up (each may take effect any
/// number of times after its invocation), so they drop out of the search
/// state and refuting a history stays cheap; if even that finds no
/// linearization, there is none. Otherwise the exact search decides.
fn check_key(h: &KeyHistory, budget: &Budget) -> KeyResult {
    match search(h, budget, true) {
        KeyResult::Violation(f) => KeyResult::Violation(f),
        KeyResult::Linearizable | KeyResult::Unknown => search(h, budget, false),
    }
}

/// Wing–Gong–Lowe search for a linearization, iterative.
///
/// The `ok` operations form a doubly linked list of calls and returns in
/// time order. At each point, an operation whose call comes before the
/// first remaining return may be linearized next, if the model accepts its
/// result; linearizing one lifts its call and return out of the list. A
/// return reached means its operation should have been linearized:
/// backtrack. Unknown operations have no return (they never force
/// anything): one may be linearized whenever it was invoked before the first
/// remaining return. Done when every `ok` operation is linearized (unknown
/// ones are optional).
///
/// `relaxed`: unknown operations are never used up and may be linearized
/// again (an over-approximation: it accepts every history the exact search
/// accepts, and more).
///
/// Pruning, each sound:
/// * configurations (linearized set, state) already seen are not explored
///   again, nor those that only add unknown operations to one seen with the
///   same `ok` set and state (they have fewer options left);
/// * an `ok` FIND or refusal that matches is taken without alternatives:
///   it changes no state, so moving it earlier never hurts;
/// * `ok` operations are tried before unknown ones, and an unknown operation
///   only if it changes the state, if it is the first unused one of its
///   class, and if it does not merely overwrite an unknown operation
///   linearized just before it.
fn search(h: &KeyHistory, budget: &Budget, relaxed: bool) -> KeyResult {
    let ops = &h.ops;
    let nodes = h.node_op.len();
    let tail = (nodes - 1) as u32;
    let mut next: Vec<u32> = (1..=nodes as u32).collect();
    let mut prev: Vec<u32> = (0..nodes as u32).map(|n| n.wrapping_sub(1)).collect();
    next[nodes - 1] = tail;
    let unlink = |next: &mut Vec<u32>, prev: &mut Vec<u32>, n: u32| {
        let (p, x) = (prev[n as usize], next[n as usize]);
        next[p as usize] = x;
        prev[x as usize] = p;
    };
    let relink = |next: &mut Vec<u32>, prev: &mut Vec<u32>, n: u32| {
        let (p, x) = (prev[n as usize], next[n as usize]);
        next[p as usize] = n;
        prev[x as usize] = n;
    };
    let first_return = |next: &Vec<u32>| {
        let mut n = next[0];
        while n != tail && !h.node_is_return[n as usize] {
            n = next[n as usize];
        }
        n
    };

    let mut state = MState::ABSENT;
    let mut ok_bits = vec![0u64; h.n_ok.div_ceil(64)];
    let mut info_bits = vec![0u64; h.n_info.div_ceil(64)];
    // Per class, how many are used (exact search): always the first ones.
    let mut used = vec![0usize; h.classes.len()];
    let mut frontier = 0usize; // every ok operation below is linearized
    let mut linearized = 0usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut seen: FxMap<Box<[u64]>, InfoSets> = FxMap::default();
    let mut explored = 0u64;
    let mut best: Option<Failure> = None;
    let started = Instant::now();

    // Phase 0: ok FINDs and refusals; 1: other ok operations (both walk the
    // list from `entry`); 2: unknown operations, by class from `class`,
    // invoked before the first remaining return (`horizon`).
    let mut phase = 0u8;
    let mut entry = next[0];
    let mut class = 0usize;
    let mut horizon = tail;
    loop {
        if linearized == h.n_ok {
            return KeyResult::Linearizable;
        }
        let candidate = if phase < 2 {
            let node = entry;
            if node == tail || h.node_is_return[node as usize] {
                phase += 1;
                if phase == 1 {
                    entry = next[0];
                } else {
                    horizon = node;
                    class = 0;
                }
                continue;
            }
            entry = next[node as usize];
            let i = h.node_op[node as usize] as usize;
            if (phase == 0) != ops[i].expect.read_only() {
                continue;
            }
            Some(i)
        } else if class < h.classes.len() {
            let c = class;
            class += 1;
            let rank = if relaxed { 0 } else { used[c] };
            match h.classes[c].get(rank) {
                Some(&i) if ops[i].call < h.node_time[horizon as usize] => Some(i),
                _ => continue,
            }
        } else {
            None
        };
        let mut dead_end = true;
        if let Some(i) = candidate {
            let k = &ops[i];
            let (outcome, after) = step(state, k.op);
            if !k.expect.accepts(outcome) {
                continue;
            }
            let forced = phase == 0;
            if k.info {
                if after == state {
                    continue;
                }
                let absorbed = stack.last().is_some_and(|top| {
                    ops[top.op as usize].info && step(top.before, k.op).1 == after
                });
                if absorbed {
                    continue;
                }
            }
            // The configuration after it.
            let old_frontier = frontier;
            if !k.info {
                ok_bits[k.slot / 64] |= 1 << (k.slot % 64);
                while frontier < h.n_ok && bit(&ok_bits, frontier) {
                    frontier += 1;
                }
            } else if !relaxed {
                info_bits[k.slot / 64] |= 1 << (k.slot % 64);
            }
            let word = frontier / 64;
            let ok_part = trimmed(&ok_bits[word.min(ok_bits.len())..]);
            let mut key = Vec::with_capacity(2 + ok_part.len());
            key.push(after.0);
            key.push(frontier as u64);
            key.extend_from_slice(ok_part);
            let info_part = trimmed(&info_bits);
            let known = seen.entry(key.into_boxed_slice()).or_insert(InfoSets::None);
            if known.dominates(info_part) {
                // Dominated by a configuration explored before.
                if !k.info {
                    ok_bits[k.slot / 64] &= !(1 << (k.slot % 64));
                } else if !relaxed {
                    info_bits[k.slot / 64] &= !(1 << (k.slot % 64));
                }
                frontier = old_frontier;
                if !forced {
                    continue;
                }
                // This configuration has a solution iff that one has.
            } else {
                known.push(info_part);
                explored += 1;
                let out_of_budget = explored > budget.max_states
                    || (explored & 1023 == 0
                        && budget.max_time.is_some_and(|t| started.elapsed() > t));
                if out_of_budget {
                    return KeyResult::Unknown;
                }
                if k.info {
                    if !relaxed {
                        used[k.class] += 1;
                    }
                } else {
                    unlink(&mut next, &mut prev, h.call_node[i]);
                    unlink(&mut next, &mut prev, h.return_node[i]);
                    linearized += 1;
                }
                stack.push(Frame {
                    op: i as u32,
                    before: state,
                    forced,
                });
                state = after;
                phase = 0;
                entry = next[0];
                dead_end = false;
            }
        } else if best.as_ref().is_none_or(|b| linearized > b.linearized) {
            best = Some(Failure {
                linearized,
                blocking: (horizon != tail).then(|| h.node_op[horizon as usize] as usize),
                state,
                last: stack.last().map(|f| f.op as usize),
            });
        }
        if !dead_end {
            continue;
        }
        // Backtrack to the last choice that has alternatives.
        loop {
            let Some(f) = stack.pop() else {
                return KeyResult::Violation(best.unwrap_or(Failure {
                    linearized: 0,
                    blocking: None,
                    state: MState::ABSENT,
                    last: None,
                }));
            };
            let i = f.op as usize;
            let k = &ops[i];
            state = f.before;
            if k.info {
                if !relaxed {
                    info_bits[k.slot / 64] &= !(1 << (k.slot % 64));
                    used[k.class] -= 1;
                }
            } else {
                relink(&mut next, &mut prev, h.return_node[i]);
                relink(&mut next, &mut prev, h.call_node[i]);
                ok_bits[k.slot / 64] &= !(1 << (k.slot % 64));
                frontier = frontier.min(k.slot);
                linearized -= 1;
            }
            if f.forced {
                continue;
            }
            if k.info {
                phase = 2;
                class = k.class + 1;
                horizon = first_return(&next);
            } else {
                phase = 1;
                entry = next[h.call_node[i] as usize];
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const L1: &str = "be1!default";
    const L2: &str = "be2!default";
    const L3: &str = "be3!default";
    const M: &str = "user.a";

    fn reserve(l: &str) -> Op {
        Op::Reserve { location: l.into() }
    }

    fn activate(l: &str, acl: &str) -> Op {
        Op::Activate {
            location: l.into(),
            acl: acl.into(),
        }
    }

    fn deactivate(l: &str) -> Op {
        Op::Deactivate { location: l.into() }
    }

    fn active(l: &str, acl: &str) -> Option<Entry> {
        Some(Entry {
            location: l.into(),
            acl: acl.into(),
            active: true,
        })
    }

    fn reserved(l: &str) -> Option<Entry> {
        Some(Entry {
            location: l.into(),
            acl: String::new(),
            active: false,
        })
    }

    fn found(entry: Option<Entry>) -> Value {
        Value::Found { entry }
    }

    fn refused(reason: &str) -> Value {
        Value::Refused {
            reason: reason.into(),
        }
    }

    const EXISTS: &str = "mailbox already exists";
    const NOT_ACTIVE: &str = "mailbox not currently active";
    const NO_SUCH: &str = "mailbox doesn't exist";

    /// A history under construction; each event one tick after the last.
    #[derive(Default)]
    struct H {
        events: Vec<Event>,
    }

    impl H {
        fn invoke_on(&mut self, p: u64, node: &str, mailbox: &str, op: Op) -> usize {
            self.events.push(Event {
                time_ns: self.events.len() as u64,
                process: p,
                kind: EventType::Invoke,
                mailbox: mailbox.into(),
                node: node.into(),
                op,
                value: None,
                error: None,
            });
            self.events.len() - 1
        }

        fn invoke(&mut self, p: u64, mailbox: &str, op: Op) -> usize {
            self.invoke_on(p, "n1", mailbox, op)
        }

        fn complete(&mut self, p: u64, kind: EventType, value: Option<Value>) -> usize {
            let inv = self
                .events
                .iter()
                .rev()
                .find(|e| e.process == p && e.kind == EventType::Invoke)
                .cloned()
                .expect("an invocation");
            self.events.push(Event {
                time_ns: self.events.len() as u64,
                kind,
                value,
                error: (kind != EventType::Ok).then(|| "timed out".to_owned()),
                ..inv
            });
            self.events.len() - 1
        }

        fn ok(&mut self, p: u64, v: Value) -> usize {
            self.complete(p, EventType::Ok, Some(v))
        }

        fn info(&mut self, p: u64) -> usize {
            self.complete(p, EventType::Info, None)
        }

        fn fail(&mut self, p: u64) -> usize {
            self.complete(p, EventType::Fail, None)
        }

        /// A sequential operation on a master: invocation, then `ok`.
        fn run(&mut self, p: u64, mailbox: &str, op: Op, v: Value) -> usize {
            self.invoke(p, mailbox, op);
            self.ok(p, v)
        }

        fn run_on(&mut self, p: u64, node: &str, mailbox: &str, op: Op, v: Value) -> usize {
            self.invoke_on(p, node, mailbox, op);
            self.ok(p, v)
        }
    }

    fn lin(h: &H) -> Verdict {
        check_linearizable(&h.events, None)
    }

    fn state(entries: &[(&str, Option<Entry>)]) -> State {
        entries
            .iter()
            .map(|(n, e)| (n.to_string(), e.clone()))
            .collect()
    }

    fn checks_of(v: &Verdict) -> Vec<(&str, Option<&str>)> {
        v.anomalies
            .iter()
            .map(|a| (a.check.as_str(), a.mailbox.as_deref()))
            .collect()
    }

    #[track_caller]
    fn assert_valid(v: &Verdict) {
        assert!(v.valid, "expected valid: {v:#?}");
        assert!(v.anomalies.is_empty() && v.unknown.is_empty());
    }

    #[track_caller]
    fn assert_only(v: &Verdict, check: &str, mailbox: &str) {
        assert!(!v.valid, "expected a {check} anomaly: {v:#?}");
        assert!(v.unknown.is_empty(), "{v:#?}");
        assert!(
            v.anomalies
                .iter()
                .all(|a| a.check == check && a.mailbox.as_deref() == Some(mailbox)),
            "expected only {check} on {mailbox}: {v:#?}"
        );
    }

    /// The registry's rules, written plainly on entries (independent of the
    /// checker's packed model). FIND shows what the wire shows: a
    /// reservation without its ACL.
    fn reference(state: &mut Option<Entry>, op: &Op) -> Value {
        match op {
            Op::Reserve { location } => match state {
                Some(e) if e.location != *location => refused(EXISTS),
                _ => {
                    *state = reserved(location);
                    Value::Done
                }
            },
            Op::Activate { location, acl } => {
                *state = active(location, acl);
                Value::Done
            }
            Op::Deactivate { location } => match state.clone() {
                None => refused(NO_SUCH),
                Some(e) if !e.active => refused(NOT_ACTIVE),
                Some(e) => {
                    *state = Some(Entry {
                        location: location.clone(),
                        acl: e.acl,
                        active: false,
                    });
                    Value::Done
                }
            },
            Op::Delete => match state.take() {
                Some(_) => Value::Done,
                None => refused(NO_SUCH),
            },
            Op::Find => found(wire(state)),
        }
    }

    fn wire(state: &Option<Entry>) -> Option<Entry> {
        state.clone().map(|mut e| {
            if !e.active {
                e.acl.clear();
            }
            e
        })
    }

    // --- The model. ---

    #[test]
    fn model_follows_the_registry_rules() {
        let states = [
            None,
            reserved(L1),
            Some(Entry {
                location: L1.into(),
                acl: "kept".into(),
                active: false,
            }),
            active(L1, "a"),
            active(L2, "b"),
        ];
        let ops = [
            reserve(L1),
            reserve(L2),
            activate(L1, "a"),
            activate(L2, "c"),
            deactivate(L1),
            deactivate(L3),
            Op::Delete,
            Op::Find,
        ];
        for before in &states {
            for op in &ops {
                let mut strings = Strings::new();
                let mut after = before.clone();
                let expected = reference(&mut after, op);
                let (outcome, next) = step(strings.state(before.as_ref()), strings.op(op));
                let expect = match &expected {
                    Value::Done => Expect::Done,
                    Value::Refused { reason } => Expect::Refused(Refusal::classify(reason)),
                    Value::Found { entry } => Expect::Found(strings.state(entry.as_ref())),
                };
                assert!(
                    expect.accepts(outcome),
                    "{op:?} on {before:?}: model {outcome:?}, reference {expected:?}"
                );
                assert_eq!(
                    next,
                    strings.state(after.as_ref()),
                    "{op:?} on {before:?}: state after"
                );
            }
        }
    }

    #[test]
    fn refusal_texts_are_matched_exactly() {
        use Refusal::*;
        for (text, kind) in [
            ("mailbox already exists", AlreadyExists),
            ("Mailbox already exists (elsewhere)", Unrecognized),
            ("mailbox not currently active", NotActive),
            ("mailbox is not active", Unrecognized),
            ("mailbox doesn't exist", DoesNotExist),
            (
                "registry unavailable: no leader; mailbox doesn't exist",
                Unrecognized,
            ),
            ("server unavailable", Unrecognized),
            (
                "request superseded by a later one of the same session",
                Unrecognized,
            ),
        ] {
            assert_eq!(Refusal::classify(text), kind, "{text}");
        }
    }

    #[test]
    fn a_reservation_may_show_without_its_acl() {
        let mut s = Strings::new();
        let kept = s.state(
            Some(Entry {
                location: L1.into(),
                acl: "kept".into(),
                active: false,
            })
            .as_ref(),
        );
        let shown = s.state(reserved(L1).as_ref());
        assert!(Expect::Found(shown).accepts(Outcome::Found(kept)));
        assert!(Expect::Found(kept).accepts(Outcome::Found(kept)));
        // But not the other way round, not for an active entry, not
        // elsewhere.
        assert!(!Expect::Found(kept).accepts(Outcome::Found(shown)));
        let a = s.state(active(L1, "kept").as_ref());
        let a_empty = s.state(active(L1, "").as_ref());
        assert!(!Expect::Found(a_empty).accepts(Outcome::Found(a)));
        let elsewhere = s.state(reserved(L2).as_ref());
        assert!(!Expect::Found(elsewhere).accepts(Outcome::Found(kept)));
    }

    // --- Valid histories pass. ---

    #[test]
    fn empty_history_is_valid() {
        let v = check_all(&[], &FinalStates::default());
        assert_valid(&v);
        assert_eq!((v.checked_mailboxes, v.operations), (0, 0));
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = H::default();
        h.run(1, M, Op::Find, found(None));
        h.run(1, M, deactivate(L1), refused(NO_SUCH));
        h.run(1, M, Op::Delete, refused(NO_SUCH));
        h.run(1, M, reserve(L1), Value::Done);
        h.run(1, M, Op::Find, found(reserved(L1)));
        h.run(1, M, deactivate(L1), refused(NOT_ACTIVE));
        h.run(1, M, reserve(L2), refused(EXISTS));
        h.run(1, M, reserve(L1), Value::Done);
        h.run(1, M, activate(L1, "u1\tlrs\t"), Value::Done);
        h.run(1, M, Op::Find, found(active(L1, "u1\tlrs\t")));
        h.run(1, M, deactivate(L2), Value::Done);
        h.run(1, M, Op::Find, found(reserved(L2)));
        h.run(1, M, reserve(L1), refused(EXISTS));
        h.run(1, M, reserve(L2), Value::Done);
        h.run(1, M, activate(L3, "x"), Value::Done);
        h.run(1, M, reserve(L3), Value::Done);
        h.run(1, M, Op::Find, found(reserved(L3)));
        h.run(1, M, Op::Delete, Value::Done);
        h.run(1, M, Op::Find, found(None));
        let v = lin(&h);
        assert_valid(&v);
        assert_eq!((v.checked_mailboxes, v.operations), (1, 19));
    }

    #[test]
    fn concurrent_operations_are_put_in_a_possible_order() {
        let mut h = H::default();
        // The refused RESERVE completes first, yet the granted one must have
        // taken effect before it.
        h.invoke(1, M, reserve(L1));
        h.invoke(2, M, reserve(L2));
        h.invoke(3, M, Op::Find);
        h.ok(2, refused(EXISTS));
        h.ok(3, found(None)); // before the RESERVE took effect
        h.invoke(3, M, Op::Find);
        h.ok(1, Value::Done);
        h.ok(3, found(reserved(L1)));
        // Two concurrent ACTIVATEs, reads that see them in either order.
        h.invoke(1, M, activate(L1, "a"));
        h.invoke(2, M, activate(L1, "b"));
        h.invoke(3, M, Op::Find);
        h.invoke(4, M, Op::Find);
        h.ok(3, found(active(L1, "b")));
        h.ok(1, Value::Done);
        h.ok(4, found(active(L1, "a")));
        h.ok(2, Value::Done);
        h.run(3, M, Op::Find, found(active(L1, "a")));
        assert_valid(&lin(&h));
    }

    #[test]
    fn unknown_write_that_took_effect_is_accepted() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.info(1);
        h.run(2, M, Op::Find, found(active(L1, "a")));
        assert_valid(&lin(&h));
    }

    #[test]
    fn unknown_write_that_never_took_effect_is_accepted() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.info(1);
        h.run(2, M, Op::Find, found(None));
        h.run(2, M, reserve(L2), Value::Done);
        h.run(2, M, Op::Find, found(reserved(L2)));
        assert_valid(&check_linearizable(
            &h.events,
            Some(&state(&[(M, reserved(L2))])),
        ));
    }

    #[test]
    fn unknown_write_may_take_effect_long_after_it_timed_out() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.info(1);
        h.run(2, M, Op::Find, found(None));
        h.run(2, M, Op::Find, found(None));
        h.run(2, M, Op::Find, found(active(L1, "a")));
        h.run(2, M, Op::Find, found(active(L1, "a")));
        assert_valid(&lin(&h));
        // But it takes effect once: it cannot be undone.
        h.run(2, M, Op::Find, found(None));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn unknown_write_takes_effect_at_most_once() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.info(1);
        h.run(2, M, Op::Find, found(active(L1, "a")));
        h.run(2, M, Op::Delete, Value::Done);
        h.run(2, M, Op::Find, found(None));
        assert_valid(&lin(&h));
        // Seeing it again would need it to take effect twice. (The relaxed
        // first stage accepts this; the exact search refutes it.)
        h.run(2, M, Op::Find, found(active(L1, "a")));
        let relaxed = KeyHistory::build(&pair(&h.events).0.iter().collect::<Vec<_>>(), 0, None);
        assert!(matches!(
            search(&relaxed, &Budget::default(), true),
            KeyResult::Linearizable
        ));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
        // Two unknown writes of it are another matter.
        let mut h2 = H::default();
        for p in [1, 3] {
            h2.invoke(p, M, activate(L1, "a"));
            h2.info(p);
        }
        h2.events.extend(h.events[2..].iter().cloned());
        assert_valid(&lin(&h2));
    }

    #[test]
    fn write_that_never_completed_counts_as_unknown() {
        let mut h = H::default();
        h.invoke(1, M, reserve(L1)); // the client died
        h.invoke(3, M, Op::Find); // never answered: ignored
        h.run(2, M, reserve(L2), refused(EXISTS));
        h.run(2, M, Op::Find, found(reserved(L1)));
        assert_valid(&lin(&h));
    }

    #[test]
    fn failed_operations_never_happened() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.fail(1);
        h.invoke(1, M, Op::Find);
        h.fail(1);
        h.invoke(1, M, Op::Find);
        h.info(1);
        h.run(2, M, Op::Find, found(None));
        assert_valid(&lin(&h));
        // A failed write that shows up is a violation.
        h.run(2, M, Op::Find, found(active(L1, "a")));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn mailboxes_are_independent() {
        let mut h = H::default();
        h.run(1, "user.x", activate(L1, "a"), Value::Done);
        h.run(1, "user.y", Op::Find, found(None));
        h.run(2, "user.y", activate(L2, "b"), Value::Done);
        h.run(2, "user.x", Op::Find, found(active(L1, "a")));
        let v = lin(&h);
        assert_valid(&v);
        assert_eq!(v.checked_mailboxes, 2);
    }

    #[test]
    fn deactivation_moves_the_reservation_and_keeps_the_acl() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        h.run(1, M, deactivate(L2), Value::Done);
        // Over the wire a reservation has no ACL; read from a store it shows
        // the kept one. Both are explained.
        h.run(1, M, Op::Find, found(reserved(L2)));
        let kept = Some(Entry {
            location: L2.into(),
            acl: "a".into(),
            active: false,
        });
        h.run(1, M, Op::Find, found(kept.clone()));
        h.run(1, M, reserve(L1), refused(EXISTS));
        assert_valid(&check_linearizable(&h.events, Some(&state(&[(M, kept)]))));
        // It did move: the old location is wrong.
        let mut bad = H::default();
        bad.run(1, M, activate(L1, "a"), Value::Done);
        bad.run(1, M, deactivate(L2), Value::Done);
        bad.run(1, M, Op::Find, found(reserved(L1)));
        assert_only(&lin(&bad), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn reserving_again_drops_the_acl() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        h.run(1, M, reserve(L1), Value::Done);
        h.run(1, M, Op::Find, found(reserved(L1)));
        h.run(1, M, deactivate(L1), refused(NOT_ACTIVE));
        assert_valid(&lin(&h));
        let mut bad = H::default();
        bad.run(1, M, activate(L1, "a"), Value::Done);
        bad.run(1, M, reserve(L1), Value::Done);
        bad.run(1, M, Op::Find, found(active(L1, "a")));
        assert_only(&lin(&bad), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn a_reservation_back_after_an_activate_is_named() {
        // A duplicated RESERVE applied after the ACTIVATE.
        let mut bad = H::default();
        bad.run(1, M, reserve(L1), Value::Done);
        bad.run(1, M, activate(L1, "a"), Value::Done);
        bad.run(2, M, Op::Find, found(reserved(L1)));
        let named = check_resurrected_reservations(&bad.events);
        assert_eq!(named.len(), 1, "{named:#?}");
        assert_eq!(named[0].check, checks::RESURRECTED);
        let v = check_all(&bad.events, &FinalStates::default());
        assert!(checks_of(&v).contains(&(checks::RESURRECTED, Some(M))));
        // A RESERVE in flight across the ACTIVATE explains it.
        let mut ok = H::default();
        ok.invoke(3, M, reserve(L1));
        ok.run(1, M, activate(L1, "a"), Value::Done);
        ok.info(3);
        ok.run(2, M, Op::Find, found(reserved(L1)));
        assert!(check_resurrected_reservations(&ok.events).is_empty());
        // So does a failed-for-sure one not.
        let mut failed = H::default();
        failed.run(1, M, activate(L1, "a"), Value::Done);
        failed.invoke(3, M, reserve(L1));
        failed.fail(3);
        failed.run(2, M, Op::Find, found(reserved(L1)));
        assert_eq!(check_resurrected_reservations(&failed.events).len(), 1);
    }

    #[test]
    fn writes_through_replicas_count_and_replica_reads_do_not() {
        let mut h = H::default();
        h.run_on(1, "r1", M, activate(L1, "a"), Value::Done);
        h.run(2, M, Op::Find, found(active(L1, "a")));
        // A lagging replica read is not a linearizability violation.
        h.run_on(3, "r2", M, Op::Find, found(None));
        let v = lin(&h);
        assert_valid(&v);
        assert_eq!(v.operations, 2);
    }

    // --- Known-bad histories fail. ---

    #[test]
    fn stale_read_is_caught() {
        let mut h = H::default();
        let write = h.run(1, M, activate(L1, "a"), Value::Done);
        let read_inv = h.invoke(2, M, Op::Find);
        let read = h.ok(2, found(None));
        let v = lin(&h);
        assert_only(&v, checks::LINEARIZABILITY, M);
        assert_eq!(v.anomalies.len(), 1);
        let a = &v.anomalies[0];
        assert!(
            a.events.contains(&read_inv) && a.events.contains(&read),
            "{a:#?}"
        );
        assert!(a.events.contains(&write), "the last linearized op: {a:#?}");
        assert!(a.message.contains("FIND"), "{}", a.message);
        // Concurrent with the write, the same read is fine.
        let mut ok = H::default();
        ok.invoke(1, M, activate(L1, "a"));
        ok.invoke(2, M, Op::Find);
        ok.ok(1, Value::Done);
        ok.ok(2, found(None));
        assert_valid(&lin(&ok));
    }

    #[test]
    fn stale_read_after_a_concurrent_history_is_caught() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.invoke(2, M, activate(L1, "b"));
        h.ok(1, Value::Done);
        h.ok(2, Value::Done);
        h.run(3, M, Op::Find, found(active(L1, "b")));
        // Once "b" was read after both completed, "a" can never show again.
        h.run(4, M, Op::Find, found(active(L1, "a")));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn read_of_a_value_no_write_produced_is_caught() {
        let mut h = H::default();
        h.invoke(1, M, activate(L1, "a"));
        h.invoke(2, M, Op::Find);
        h.ok(2, found(active(L1, "zzz")));
        h.ok(1, Value::Done);
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
        let mut h = H::default();
        h.run(2, M, Op::Find, found(reserved(L3)));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn refusals_the_state_cannot_explain_are_caught() {
        let mut h = H::default();
        // RESERVE refused on a mailbox that does not exist.
        h.run(1, "user.a", reserve(L1), refused(EXISTS));
        // DEACTIVATE refused "not active" on an active one.
        h.run(1, "user.b", activate(L1, "x"), Value::Done);
        h.run(1, "user.b", deactivate(L1), refused(NOT_ACTIVE));
        // DELETE refused "doesn't exist" on a reserved one.
        h.run(1, "user.c", reserve(L1), Value::Done);
        h.run(1, "user.c", Op::Delete, refused(NO_SUCH));
        // RESERVE refused at the location that holds it.
        h.run(1, "user.d", reserve(L1), Value::Done);
        h.run(1, "user.d", reserve(L1), refused(EXISTS));
        // A refusal that is none of the model's.
        h.run(1, "user.e", reserve(L1), refused("permission denied"));
        // And the right refusals, for contrast.
        h.run(1, "user.f", Op::Delete, refused(NO_SUCH));
        h.run(1, "user.f", reserve(L1), Value::Done);
        h.run(1, "user.f", deactivate(L1), refused(NOT_ACTIVE));
        h.run(1, "user.f", reserve(L2), refused(EXISTS));
        let v = lin(&h);
        let mut bad: Vec<_> = checks_of(&v);
        bad.sort();
        assert_eq!(
            bad,
            ["user.a", "user.b", "user.c", "user.d", "user.e"]
                .map(|m| (checks::LINEARIZABILITY, Some(m)))
                .to_vec(),
            "{v:#?}"
        );
    }

    #[test]
    fn acknowledged_write_then_refusal_contradiction_is_caught() {
        // Two granted RESERVEs at different locations, sequential: the
        // second should have been refused.
        let mut h = H::default();
        h.run(1, M, reserve(L1), Value::Done);
        h.run(2, M, reserve(L2), Value::Done);
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    #[test]
    fn lost_acknowledged_write_is_a_final_state_anomaly() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        h.run(2, M, Op::Find, found(active(L1, "a")));
        assert_valid(&lin(&h));
        // The final state lacks the acknowledged write.
        for final_state in [state(&[]), state(&[(M, None)]), state(&[(M, reserved(L1))])] {
            let v = check_linearizable(&h.events, Some(&final_state));
            assert_only(&v, checks::FINAL_STATE, M);
            assert!(v.anomalies[0].message.contains("final read"), "{v:#?}");
            assert_only(
                &check_final_state(&h.events, &final_state),
                checks::FINAL_STATE,
                M,
            );
        }
        assert_valid(&check_final_state(
            &h.events,
            &state(&[(M, active(L1, "a"))]),
        ));
    }

    #[test]
    fn final_state_may_include_an_unknown_write_or_not() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        h.invoke(1, M, activate(L1, "b"));
        h.info(1);
        for ok in [active(L1, "a"), active(L1, "b")] {
            assert_valid(&check_final_state(&h.events, &state(&[(M, ok)])));
        }
        let v = check_final_state(&h.events, &state(&[(M, active(L1, "c"))]));
        assert_only(&v, checks::FINAL_STATE, M);
    }

    #[test]
    fn final_state_with_a_mailbox_nobody_wrote_is_caught() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        let final_state = state(&[(M, active(L1, "a")), ("user.ghost", reserved(L1))]);
        let v = check_linearizable(&h.events, Some(&final_state));
        assert_only(&v, checks::FINAL_STATE, "user.ghost");
        assert_eq!(v.checked_mailboxes, 2);
        // Listed as absent, it is fine.
        let final_state = state(&[(M, active(L1, "a")), ("user.ghost", None)]);
        assert_valid(&check_linearizable(&h.events, Some(&final_state)));
    }

    #[test]
    fn a_non_linearizable_history_is_reported_once_per_check() {
        let mut h = H::default();
        h.run(1, M, activate(L1, "a"), Value::Done);
        h.run(2, M, Op::Find, found(None));
        let final_state = state(&[(M, active(L1, "a"))]);
        let v = check_linearizable(&h.events, Some(&final_state));
        assert_only(&v, checks::LINEARIZABILITY, M);
        assert_eq!(v.anomalies.len(), 1);
        let v = check_final_state(&h.events, &final_state);
        assert_only(&v, checks::FINAL_STATE, M);
        assert_eq!(v.anomalies.len(), 1);
    }

    // --- Ownership. ---

    #[test]
    fn double_owner_is_caught() {
        let mut h = H::default();
        h.invoke_on(1, "n1", M, reserve("be1!default"));
        h.invoke_on(2, "n2", M, reserve("be2!default"));
        h.invoke_on(3, "n3", M, reserve("be3!default"));
        h.ok(1, Value::Done);
        h.ok(2, Value::Done);
        h.ok(3, refused(EXISTS));
        let owners = check_ownership(&h.events);
        assert_eq!(owners.len(), 1, "{owners:#?}");
        assert_eq!(owners[0].check, checks::OWNERSHIP);
        assert_eq!(owners[0].mailbox.as_deref(), Some(M));
        assert_eq!(owners[0].events, vec![0, 1, 3, 4]);
        assert!(owners[0].message.contains("double owner"));
        // Linearizability sees it too.
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
        let v = check_all(&h.events, &FinalStates::default());
        let mut kinds: Vec<_> = checks_of(&v).into_iter().map(|(c, _)| c).collect();
        kinds.sort();
        assert_eq!(kinds, [checks::LINEARIZABILITY, checks::OWNERSHIP]);
    }

    #[test]
    fn one_owner_is_fine() {
        let mut h = H::default();
        for p in 1..=5 {
            h.invoke(p, M, reserve(&format!("be{p}!default")));
        }
        h.ok(3, Value::Done);
        for p in [1, 2, 4] {
            h.ok(p, refused(EXISTS));
        }
        h.info(5); // unknown: never counted as a grant
        h.run(3, M, reserve("be3!default"), Value::Done); // same owner again
        for p in 1..=5 {
            h.run(p, M, Op::Find, found(reserved("be3!default")));
        }
        assert!(check_ownership(&h.events).is_empty());
        assert_valid(&check_all(&h.events, &FinalStates::default()));
    }

    #[test]
    fn ownership_may_change_hands_through_a_deletion() {
        let grant = |h: &mut H, p: u64, l: &str| h.run(p, M, reserve(l), Value::Done);
        // An acknowledged DELETE in between.
        let mut h = H::default();
        grant(&mut h, 1, L1);
        h.run(9, M, Op::Delete, Value::Done);
        grant(&mut h, 2, L2);
        assert!(check_ownership(&h.events).is_empty());
        // An unknown DELETE invoked before the second grant completed.
        let mut h = H::default();
        grant(&mut h, 1, L1);
        h.invoke(9, M, Op::Delete);
        h.info(9);
        grant(&mut h, 2, L2);
        assert!(check_ownership(&h.events).is_empty());
        // A DELETE that completed before the first grant was invoked cannot
        // separate them, nor can a failed or refused one.
        for (before, outcome) in [
            (true, EventType::Ok),
            (false, EventType::Fail),
            (false, EventType::Ok),
        ] {
            let mut h = H::default();
            let delete = |h: &mut H| {
                h.invoke(9, M, Op::Delete);
                match outcome {
                    EventType::Ok if before => h.ok(9, refused(NO_SUCH)),
                    EventType::Ok => h.ok(9, refused(NO_SUCH)),
                    other => h.complete(9, other, None),
                }
            };
            if before {
                delete(&mut h);
            }
            grant(&mut h, 1, L1);
            if !before {
                delete(&mut h);
            }
            grant(&mut h, 2, L2);
            assert_eq!(check_ownership(&h.events).len(), 1, "{before} {outcome:?}");
        }
        // A DELETE granted before the first RESERVE was even invoked.
        let mut h = H::default();
        h.run(9, M, reserve(L3), Value::Done);
        h.run(9, M, Op::Delete, Value::Done);
        grant(&mut h, 1, L1);
        grant(&mut h, 2, L2);
        assert_eq!(check_ownership(&h.events).len(), 1);
    }

    #[test]
    fn ownership_skips_mailboxes_that_move() {
        let mut h = H::default();
        h.run(1, M, reserve(L1), Value::Done);
        h.run(1, M, activate(L2, "a"), Value::Done);
        h.run(1, M, reserve(L2), Value::Done);
        assert!(check_ownership(&h.events).is_empty());
        assert_valid(&lin(&h));
    }

    // --- Replica reads. ---

    /// A replicas-workload history: the writer's versions with their
    /// outcomes, then `reads` as (process, replica, version seen, overlapping
    /// the previous read).
    fn write_version(h: &mut H, v: u64, kind: EventType) {
        h.invoke(100, M, activate(L1, &format!("v{v}")));
        match kind {
            EventType::Ok => h.ok(100, Value::Done),
            other => h.complete(100, other, None),
        };
    }

    fn read_version(h: &mut H, p: u64, replica: &str, v: u64) -> usize {
        let entry = (v > 0).then(|| active(L1, &format!("v{v}"))).flatten();
        h.run_on(p, replica, M, Op::Find, found(entry))
    }

    #[test]
    fn monotonic_replica_reads_pass() {
        let mut h = H::default();
        read_version(&mut h, 1, "r1", 0);
        write_version(&mut h, 1, EventType::Ok);
        read_version(&mut h, 1, "r1", 0);
        read_version(&mut h, 2, "r2", 1);
        write_version(&mut h, 2, EventType::Info);
        write_version(&mut h, 3, EventType::Ok);
        read_version(&mut h, 1, "r1", 1);
        read_version(&mut h, 1, "r1", 3);
        read_version(&mut h, 2, "r2", 2);
        read_version(&mut h, 2, "r2", 3);
        read_version(&mut h, 3, "r2", 3);
        assert!(check_monotonic_replica_reads(&h.events).is_empty());
        assert_valid(&check_all(&h.events, &FinalStates::default()));
    }

    #[test]
    fn replica_going_back_in_time_is_caught() {
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        write_version(&mut h, 2, EventType::Ok);
        let newer = read_version(&mut h, 1, "r1", 2);
        let older = read_version(&mut h, 2, "r1", 1);
        let found = check_monotonic_replica_reads(&h.events);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].check, checks::REPLICA_READS);
        assert!(found[0].events.contains(&newer) && found[0].events.contains(&older));
        assert!(found[0].message.contains("back in time"));
        // Master linearizability does not look at replica reads.
        assert_valid(&lin(&h));
        assert!(!check_all(&h.events, &FinalStates::default()).valid);
        // Going back to nothing.
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        read_version(&mut h, 1, "r1", 1);
        read_version(&mut h, 1, "r1", 0);
        assert_eq!(check_monotonic_replica_reads(&h.events).len(), 1);
    }

    #[test]
    fn replica_reads_that_may_be_ordered_either_way_pass() {
        // Overlapping reads on one replica.
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        write_version(&mut h, 2, EventType::Ok);
        h.invoke_on(1, "r1", M, Op::Find);
        h.invoke_on(2, "r1", M, Op::Find);
        h.ok(1, found(active(L1, "v2")));
        h.ok(2, found(active(L1, "v1")));
        // Different replicas lag differently.
        read_version(&mut h, 3, "r2", 2);
        read_version(&mut h, 3, "r3", 1);
        // A version whose write is unknown may have landed late.
        write_version(&mut h, 3, EventType::Info);
        write_version(&mut h, 4, EventType::Ok);
        read_version(&mut h, 4, "r4", 4);
        read_version(&mut h, 4, "r4", 3);
        assert!(check_monotonic_replica_reads(&h.events).is_empty());
    }

    #[test]
    fn replica_read_of_something_never_written_is_caught() {
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        write_version(&mut h, 2, EventType::Fail);
        read_version(&mut h, 1, "r1", 7); // never written
        read_version(&mut h, 1, "r2", 2); // its write failed
        h.run_on(1, "r3", M, Op::Find, found(active(L2, "v1"))); // wrong place
        h.run_on(1, "r3", M, Op::Find, found(active(L1, "junk"))); // not a version
        let early = read_version(&mut h, 1, "r4", 3); // before v3 was written
        write_version(&mut h, 3, EventType::Ok);
        let found = check_monotonic_replica_reads(&h.events);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found.iter().all(|a| a.check == checks::REPLICA_READS));
        assert!(found.iter().any(|a| a.events.contains(&early)));
    }

    #[test]
    fn replica_reads_of_other_shapes_are_skipped() {
        // Two writers: versions do not increase with time.
        let mut h = H::default();
        h.run(1, M, activate(L1, "v5"), Value::Done);
        h.run(2, M, activate(L1, "v1"), Value::Done);
        read_version(&mut h, 3, "r1", 5);
        read_version(&mut h, 3, "r1", 1);
        assert!(check_monotonic_replica_reads(&h.events).is_empty());
    }

    #[test]
    fn replica_anomalies_are_capped() {
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        write_version(&mut h, 2, EventType::Ok);
        for _ in 0..30 {
            read_version(&mut h, 1, "r1", 2);
            read_version(&mut h, 1, "r1", 1);
        }
        let found = check_monotonic_replica_reads(&h.events);
        assert_eq!(found.len(), MAX_REPORTED + 1);
        assert!(found.last().unwrap().message.contains("more"));
    }

    // --- Convergence. ---

    #[test]
    fn convergence_reports_every_difference() {
        let masters = state(&[
            ("user.a", active(L1, "a")),
            ("user.b", reserved(L2)),
            ("user.gone", None),
        ]);
        let same = state(&[("user.b", reserved(L2)), ("user.a", active(L1, "a"))]);
        let differs = state(&[("user.a", active(L1, "old")), ("user.extra", reserved(L1))]);
        let replicas: BTreeMap<String, State> =
            [("r1".to_owned(), same), ("r2".to_owned(), differs)].into();
        let found = check_convergence(&masters, &replicas);
        let mut where_: Vec<_> = found
            .iter()
            .map(|a| (a.check.as_str(), a.mailbox.clone().unwrap()))
            .collect();
        where_.sort();
        assert_eq!(
            where_,
            [
                (checks::CONVERGENCE, "user.a".to_owned()),
                (checks::CONVERGENCE, "user.b".to_owned()),
                (checks::CONVERGENCE, "user.extra".to_owned()),
            ]
        );
        assert!(found.iter().all(|a| a.message.contains("replica r2")));
        let replicas: BTreeMap<String, State> = [("r1".to_owned(), masters.clone())].into();
        assert!(check_convergence(&masters, &replicas).is_empty());
    }

    // --- Malformed histories, check_all, serialization. ---

    #[test]
    fn malformed_history_is_reported() {
        let mut h = H::default();
        h.run(1, M, Op::Find, found(None));
        // A completion with no invocation.
        let mut stray = h.events[1].clone();
        stray.process = 7;
        h.events.push(stray);
        // An ok completion without a value.
        h.invoke(2, M, activate(L1, "a"));
        h.complete(2, EventType::Ok, None);
        // Two invocations in flight on one process.
        h.invoke(3, M, Op::Find);
        h.invoke(3, M, Op::Find);
        h.ok(3, found(active(L1, "a")));
        let v = lin(&h);
        assert_eq!(checks_of(&v), vec![(checks::HISTORY, Some(M)); 3], "{v:#?}");
    }

    #[test]
    fn check_all_combines_everything_and_serializes() {
        let mut h = H::default();
        write_version(&mut h, 1, EventType::Ok);
        read_version(&mut h, 1, "r1", 1);
        h.run(2, "user.own0", reserve(L2), Value::Done);
        let masters = state(&[(M, active(L1, "v1")), ("user.own0", reserved(L2))]);
        let mut finals = FinalStates {
            masters: Some(masters.clone()),
            replicas: [("r1".to_owned(), masters.clone())].into(),
        };
        let v = check_all(&h.events, &finals);
        assert_valid(&v);
        assert_eq!((v.checked_mailboxes, v.operations), (2, 3));
        finals
            .replicas
            .insert("r2".into(), state(&[(M, active(L1, "v1"))]));
        let v = check_all(&h.events, &finals);
        assert_eq!(checks_of(&v), [(checks::CONVERGENCE, Some("user.own0"))]);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["valid"], false);
        assert_eq!(json["anomalies"][0]["check"], "convergence");
        assert_eq!(json["anomalies"][0]["mailbox"], "user.own0");
        let back: Verdict = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
        // A lost write on top.
        finals.masters = Some(state(&[("user.own0", reserved(L2))]));
        let v = check_all(&h.events, &finals);
        assert!(
            checks_of(&v).contains(&(checks::FINAL_STATE, Some(M))),
            "{v:#?}"
        );
    }

    // --- Random histories, performance, budget. ---

    /// A valid history: `ops` operations of the registry workload on
    /// `mailboxes` names by `processes` clients, each taking effect at
    /// its own instant inside a random interval, some with unknown or
    /// failed outcomes. Returns the events and the final state.
    fn random_history(
        seed: u64,
        processes: usize,
        mailboxes: usize,
        ops: usize,
        unknown_rate: f64,
    ) -> (Vec<Event>, State) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut states: State = (0..mailboxes)
            .map(|m| (format!("user.j{m}"), None))
            .collect();
        let mut free_at = vec![0u64; processes];
        // A client that never returns is replaced by a new process.
        let mut ids: Vec<u64> = (0..processes as u64).collect();
        let mut timed: Vec<(u64, usize, Event)> = Vec::new();
        let locations = [L1, L2, L3];
        for k in 0..ops {
            let at = (k as u64 + 1) * 100;
            let free: Vec<usize> = (0..processes).filter(|p| free_at[*p] + 1 < at).collect();
            if free.is_empty() {
                continue;
            }
            let p = free[rng.gen_range(0..free.len())];
            let invoke = rng.gen_range((free_at[p] + 1).max(at.saturating_sub(600))..at);
            let complete = at + rng.gen_range(1..600);
            free_at[p] = complete;
            let mailbox = format!("user.j{}", rng.gen_range(0..mailboxes));
            let location = locations[rng.gen_range(0..3)];
            let op = match rng.gen_range(0..10) {
                0 | 1 => reserve(location),
                2 | 3 => activate(location, &format!("u{}\tlrs\t", rng.gen_range(0..4))),
                4 => deactivate(location),
                5 => Op::Delete,
                _ => Op::Find,
            };
            let st = states.get_mut(&mailbox).unwrap();
            let inv = Event {
                time_ns: invoke,
                process: ids[p],
                kind: EventType::Invoke,
                mailbox,
                node: format!("n{}", rng.gen_range(1..=3)),
                op: op.clone(),
                value: None,
                error: None,
            };
            let roll: f64 = rng.gen();
            let completion = if op.is_write() && roll < unknown_rate {
                if rng.gen_bool(0.5) {
                    reference(st, &op);
                }
                if rng.gen_bool(0.1) {
                    ids[p] += processes as u64; // the client never returns
                    None
                } else {
                    Some((EventType::Info, None))
                }
            } else if roll < unknown_rate + 0.02 {
                Some((EventType::Fail, None))
            } else {
                Some((EventType::Ok, Some(reference(st, &op))))
            };
            timed.push((invoke, timed.len(), inv.clone()));
            if let Some((kind, value)) = completion {
                let e = Event {
                    time_ns: complete,
                    kind,
                    value,
                    ..inv
                };
                timed.push((complete, timed.len(), e));
            }
        }
        timed.sort_by_key(|(t, seq, _)| (*t, *seq));
        (timed.into_iter().map(|(_, _, e)| e).collect(), states)
    }

    #[test]
    fn random_valid_histories_pass() {
        for seed in 0..40 {
            let (events, final_state) = random_history(seed, 10, 8, 400, 0.05);
            let v = check_linearizable(&events, Some(&final_state));
            assert!(v.valid, "seed {seed}: {v:#?}");
            assert_eq!(v.checked_mailboxes, 8);
            // Nothing else objects either.
            let finals = FinalStates {
                masters: Some(final_state),
                replicas: BTreeMap::new(),
            };
            assert_valid(&check_all(&events, &finals));
        }
    }

    #[test]
    fn random_corrupted_read_is_caught() {
        let mut caught = 0;
        for seed in 0..40 {
            let (mut events, _) = random_history(seed, 10, 8, 400, 0.05);
            let mut rng = StdRng::seed_from_u64(seed ^ 0xbad);
            let reads: Vec<usize> = (0..events.len())
                .filter(|i| events[*i].kind == EventType::Ok && events[*i].op == Op::Find)
                .collect();
            let i = reads[rng.gen_range(0..reads.len())];
            events[i].value = Some(found(active("be9!default", "corrupt")));
            let v = check_linearizable(&events, None);
            let mailbox = events[i].mailbox.clone();
            assert_eq!(
                checks_of(&v),
                [(checks::LINEARIZABILITY, Some(mailbox.as_str()))],
                "seed {seed}"
            );
            assert!(v.anomalies[0].events.contains(&i), "seed {seed}: {v:#?}");
            caught += 1;
        }
        assert_eq!(caught, 40);
    }

    #[test]
    fn random_lost_write_is_caught() {
        for seed in 0..20 {
            let (mut events, final_state) = random_history(seed, 10, 8, 400, 0.05);
            assert!(check_linearizable(&events, Some(&final_state)).valid);
            // One more acknowledged write after everything else, missing
            // from the final state.
            let mailbox = format!("user.j{}", seed % 8);
            let t = events.last().unwrap().time_ns;
            let inv = Event {
                time_ns: t + 1,
                process: 999,
                kind: EventType::Invoke,
                mailbox: mailbox.clone(),
                node: "n1".into(),
                op: activate(L1, "last"),
                value: None,
                error: None,
            };
            events.push(inv.clone());
            events.push(Event {
                time_ns: t + 2,
                kind: EventType::Ok,
                value: Some(Value::Done),
                ..inv
            });
            let v = check_linearizable(&events, Some(&final_state));
            assert_eq!(
                checks_of(&v),
                [(checks::FINAL_STATE, Some(mailbox.as_str()))],
                "seed {seed}: {v:#?}"
            );
        }
    }

    #[test]
    fn large_history_checks_quickly() {
        // About a minute of ten clients on eight names.
        let (events, final_state) = random_history(7, 10, 8, 30_000, 0.03);
        let started = Instant::now();
        let v = check_linearizable(&events, Some(&final_state));
        let took = started.elapsed();
        assert!(v.valid, "{:#?}", v.anomalies);
        assert!(v.operations > 25_000, "{}", v.operations);
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    #[test]
    fn many_unknown_writes_stay_tractable() {
        // One name, a third of the writes unknown.
        let (events, final_state) = random_history(11, 10, 1, 3_000, 0.3);
        let started = Instant::now();
        let v = check_linearizable(&events, Some(&final_state));
        assert!(v.valid, "{:#?}", v.anomalies);
        assert!(started.elapsed() < Duration::from_secs(10));
        // A read of something never written is refuted (not unknown), fast:
        // the relaxed search does not track which unknown writes are used.
        let mut events = events;
        let i = events
            .iter()
            .rposition(|e| e.kind == EventType::Ok && e.op == Op::Find)
            .unwrap();
        events[i].value = Some(found(active("be9!default", "corrupt")));
        let started = Instant::now();
        let v = check_linearizable(&events, None);
        assert_only(&v, checks::LINEARIZABILITY, "user.j0");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn deep_history_does_not_overflow_the_stack() {
        let mut h = H::default();
        for i in 0..10_000 {
            h.run(1, M, activate(L1, &format!("u{}", i % 7)), Value::Done);
        }
        // The last write was u3 (9999 % 7).
        h.run(2, M, Op::Find, found(active(L1, "u3")));
        assert_valid(&lin(&h));
        h.run(2, M, Op::Find, found(active(L1, "u5")));
        assert_only(&lin(&h), checks::LINEARIZABILITY, M);
    }

    /// Many concurrent ACTIVATEs and a read no order explains: exponential.
    fn exponential_history(writers: u64) -> H {
        let mut h = H::default();
        for p in 0..writers {
            h.invoke(p, M, activate(L1, &format!("a{p}")));
        }
        for p in 0..writers {
            h.ok(p, Value::Done);
        }
        h.run(99, M, Op::Find, found(active(L1, "nobody")));
        h
    }

    #[test]
    fn budget_yields_unknown_instead_of_hanging() {
        let mut h = H::default();
        for _ in 0..10 {
            h.run(1, M, reserve(L1), Value::Done);
            h.run(1, M, activate(L1, "a"), Value::Done);
        }
        let tiny = Budget {
            max_states: 3,
            max_time: None,
        };
        let v = check_linearizable_with(&h.events, None, &tiny);
        assert!(!v.valid);
        assert_eq!(v.unknown, [M]);
        assert!(v.anomalies.is_empty());

        let h = exponential_history(18);
        for budget in [
            Budget {
                max_states: 10_000,
                max_time: None,
            },
            Budget {
                max_states: u64::MAX,
                max_time: Some(Duration::ZERO),
            },
        ] {
            let started = Instant::now();
            let v = check_linearizable_with(&h.events, None, &budget);
            assert_eq!(v.unknown, [M], "{budget:?}");
            assert!(!v.valid);
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        // With enough budget the small version is refuted.
        let v = check_linearizable(&exponential_history(8).events, None);
        assert_only(&v, checks::LINEARIZABILITY, M);
    }

    // --- Differential test against brute force. ---

    /// Whether a FIND showing `seen` is explained by `state`.
    fn shows(seen: &Option<Entry>, state: &Option<Entry>) -> bool {
        seen == state || (seen.is_some() && *seen == wire(state))
    }

    struct BruteOp {
        call: usize,
        ret: Option<usize>,
        op: Op,
        value: Option<Value>,
    }

    /// Every order of every subset of the unknown operations: no pruning.
    fn brute_force(events: &[Event], final_entry: Option<Option<Entry>>) -> bool {
        let mut ops: Vec<BruteOp> = Vec::new();
        let mut open: HashMap<u64, usize> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            if e.kind == EventType::Invoke {
                open.insert(e.process, ops.len());
                ops.push(BruteOp {
                    call: i,
                    ret: None,
                    op: e.op.clone(),
                    value: None,
                });
                continue;
            }
            let o = open.remove(&e.process).unwrap();
            match e.kind {
                EventType::Ok => {
                    ops[o].ret = Some(i);
                    ops[o].value = e.value.clone();
                }
                EventType::Fail => ops[o].call = usize::MAX, // dropped below
                _ => {}
            }
        }
        ops.retain(|o| o.call != usize::MAX && (o.ret.is_some() || o.op.is_write()));
        if let Some(entry) = final_entry {
            ops.push(BruteOp {
                call: events.len(),
                ret: Some(events.len() + 1),
                op: Op::Find,
                value: Some(found(entry)),
            });
        }
        fn go(ops: &[BruteOp], done: &mut Vec<bool>, state: &Option<Entry>) -> bool {
            let remaining: Vec<usize> = (0..ops.len()).filter(|i| !done[*i]).collect();
            if remaining.iter().all(|i| ops[*i].ret.is_none()) {
                return true;
            }
            for &i in &remaining {
                let must_wait = remaining
                    .iter()
                    .any(|&j| j != i && ops[j].ret.is_some_and(|r| r < ops[i].call));
                if must_wait {
                    continue;
                }
                let mut next = state.clone();
                let answer = reference(&mut next, &ops[i].op);
                let matches = match (&ops[i].value, &answer) {
                    (None, _) => true,
                    (Some(Value::Found { entry: seen }), Value::Found { .. }) => shows(seen, state),
                    (Some(Value::Refused { reason }), Value::Refused { reason: r }) => {
                        let kind = Refusal::classify(reason);
                        kind != Refusal::Unrecognized && kind == Refusal::classify(r)
                    }
                    (Some(v), a) => v == a,
                };
                if !matches {
                    continue;
                }
                done[i] = true;
                if go(ops, done, &next) {
                    return true;
                }
                done[i] = false;
            }
            false
        }
        let mut done = vec![false; ops.len()];
        go(&ops, &mut done, &None)
    }

    /// A small random history on one mailbox: partly simulated, partly
    /// random answers, with unknown, failed and unfinished operations.
    fn small_random_history(rng: &mut StdRng) -> (Vec<Event>, Option<Option<Entry>>) {
        let mut h = H::default();
        let mut truth: Option<Entry> = None;
        let mut in_flight: Vec<u64> = Vec::new();
        let mut dead: Vec<u64> = Vec::new();
        let entries = || {
            [
                None,
                reserved(L1),
                reserved(L2),
                active(L1, "a"),
                active(L1, "b"),
                active(L2, "a"),
            ]
        };
        let n = rng.gen_range(2..=7);
        let mut invoked = 0;
        while invoked < n || !in_flight.is_empty() {
            let start =
                invoked < n && (in_flight.is_empty() || rng.gen_bool(0.5)) && in_flight.len() < 4;
            if start {
                let p = (0..12u64).find(|p| !in_flight.contains(p) && !dead.contains(p));
                let Some(p) = p else {
                    invoked = n;
                    continue;
                };
                let l = [L1, L2][rng.gen_range(0..2)];
                let op = match rng.gen_range(0..6) {
                    0 => reserve(l),
                    1 => activate(l, ["a", "b"][rng.gen_range(0..2)]),
                    2 => deactivate(l),
                    3 => Op::Delete,
                    _ => Op::Find,
                };
                h.invoke(p, M, op);
                in_flight.push(p);
                invoked += 1;
                continue;
            }
            let p = in_flight.remove(rng.gen_range(0..in_flight.len()));
            let op = h
                .events
                .iter()
                .rev()
                .find(|e| e.process == p)
                .unwrap()
                .op
                .clone();
            match rng.gen_range(0..20) {
                0..=2 => {
                    if op.is_write() && rng.gen_bool(0.5) {
                        reference(&mut truth, &op);
                    }
                    h.info(p);
                }
                3 => {
                    h.fail(p);
                }
                4 => dead.push(p), // never completes
                5..=8 => {
                    // A random answer.
                    let v = if op == Op::Find {
                        found(entries()[rng.gen_range(0..6)].clone())
                    } else {
                        [
                            Value::Done,
                            refused(EXISTS),
                            refused(NOT_ACTIVE),
                            refused(NO_SUCH),
                        ][rng.gen_range(0..4)]
                        .clone()
                    };
                    h.ok(p, v);
                }
                _ => {
                    let v = reference(&mut truth, &op);
                    h.ok(p, v);
                }
            }
        }
        let final_entry = match rng.gen_range(0..3) {
            0 => None,
            1 => Some(truth),
            _ => Some(entries()[rng.gen_range(0..6)].clone()),
        };
        (h.events, final_entry)
    }

    #[test]
    fn search_agrees_with_brute_force() {
        let mut rng = StdRng::seed_from_u64(42);
        let (mut valid, mut invalid) = (0, 0);
        for case in 0..20_000 {
            let (events, final_entry) = small_random_history(&mut rng);
            let expected = brute_force(&events, final_entry.clone());
            let final_state = final_entry.clone().map(|e| state(&[(M, e)]));
            let v = check_linearizable(&events, final_state.as_ref());
            assert!(v.unknown.is_empty());
            assert_eq!(
                v.valid, expected,
                "case {case}: final {final_entry:?}\n{events:#?}\n{v:#?}"
            );
            if expected {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        // Both kinds were exercised.
        assert!(
            valid > 3_000 && invalid > 3_000,
            "{valid} valid, {invalid} invalid"
        );
    }
}
