//! Proof that every fault happened: for each fault window, what the
//! clients got from each node and what the nodes' metrics said about
//! leaders and terms, and the checks that fail a run with "nemesis had no
//! effect":
//!
//! * a partition that cuts a master off from a majority, yet that master
//!   acknowledges a write more than [`GRACE`] after the cut;
//! * a partition that cuts the clients off from a node, yet the node
//!   answers a client more than [`GRACE`] after the cut;
//! * a partition that cuts the leader off, and no master on the majority
//!   side leads in a newer term within [`ELECTION_DEADLINE`] (plus one
//!   sampling interval, the monitor's resolution);
//! * a killed or paused node that still answers (a client or a metrics
//!   scrape) more than [`GRACE`] after the fault.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::history::{Event, EventType, NemesisEvent, Value};
use crate::monitor::{Sample, INTERVAL};

/// How long after a fault starts a node may still answer (operations
/// already in flight, the rules taking effect).
pub const GRACE: Duration = Duration::from_secs(1);

/// How soon the majority side must elect a new leader when the leader is
/// cut off.
pub const ELECTION_DEADLINE: Duration = Duration::from_secs(2);

/// What one fault window shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// The fault (`partition-leader`, `kill`…).
    pub fault: String,
    /// When it was in force (s since the run started).
    pub start_s: f64,
    /// When healing began.
    pub end_s: f64,
    /// The rules or the victim.
    pub detail: String,
    /// Masters that must not acknowledge writes (cut off, killed, paused).
    pub isolated: Vec<String>,
    /// Masters on the side that can elect.
    pub majority: Vec<String>,
    /// Processes the clients cannot reach.
    pub unreachable: Vec<String>,
    /// Completions in the window by node: `[ok, fail, info]`.
    pub ops: BTreeMap<String, [usize; 3]>,
    /// Per isolated or unreachable node: acknowledgements after the grace
    /// period (applied writes for an isolated master, any ok for a node
    /// the clients cannot reach or that is down).
    pub late_acks: BTreeMap<String, usize>,
    /// Per killed or paused node: metrics scrapes answered after the grace
    /// period.
    pub late_answers: BTreeMap<String, usize>,
    /// The leader just before, and its term per the metrics.
    pub leader_before: Option<String>,
    /// The highest term any node reported before the fault.
    pub term_before: Option<u64>,
    /// Every (leader, term) the metrics showed during the window, in the
    /// order first seen (a deposed leader that has not heard of the new
    /// term yet still says it leads in its old one).
    pub leaders: Vec<(String, u64)>,
    /// The first master on the majority side to lead in a newer term:
    /// `(node, term, seconds after the start)`.
    pub new_leader: Option<(String, u64, f64)>,
    /// Highest term reported during the window.
    pub term_after: Option<u64>,
    /// The highest heartbeat age a node reported per peer while it said it
    /// led (`n1→n2`), in s. A cut-off leader's ages grow until it learns
    /// of the new term.
    pub heartbeat_max_s: BTreeMap<String, f64>,
    /// Why the fault shows no effect; empty if it does.
    pub problems: Vec<String>,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Pairs each start with the next stop of the same fault (a start never
/// stopped lasts until `end_ns`).
fn windows_of(nemesis: &[NemesisEvent], end_ns: u64) -> Vec<(&NemesisEvent, u64)> {
    let mut out = Vec::new();
    for (i, e) in nemesis.iter().enumerate() {
        if e.phase != "start" {
            continue;
        }
        let stop = nemesis[i + 1..]
            .iter()
            .find(|s| s.phase == "stop" && s.fault == e.fault)
            .map_or(end_ns, |s| s.time_ns);
        out.push((e, stop.max(e.time_ns)));
    }
    out
}

/// Analyses every fault window of a run: client `events`, `nemesis` events
/// and the monitor's `samples`, all in time order.
pub fn analyse(events: &[Event], nemesis: &[NemesisEvent], samples: &[Sample]) -> Vec<Window> {
    let end_ns = events
        .iter()
        .map(|e| e.time_ns)
        .chain(nemesis.iter().map(|e| e.time_ns))
        .max()
        .unwrap_or(0);
    windows_of(nemesis, end_ns)
        .into_iter()
        .map(|(start, stop)| window(start, stop, events, samples))
        .collect()
}

fn window(start: &NemesisEvent, end_ns: u64, events: &[Event], samples: &[Sample]) -> Window {
    let start_ns = start.time_ns;
    let grace_ns = start_ns + GRACE.as_nanos() as u64;
    let mut w = Window {
        fault: start.fault.clone(),
        start_s: secs(start_ns),
        end_s: secs(end_ns),
        detail: start.detail.clone(),
        isolated: start.isolated.clone(),
        majority: start.majority.clone(),
        unreachable: start.unreachable.clone(),
        leader_before: start.leader.clone(),
        ..Window::default()
    };
    let partition = w.fault.starts_with("partition");
    let down = w.fault == "kill" || w.fault == "pause" || w.fault == "power-loss";

    for e in events
        .iter()
        .filter(|e| e.kind != EventType::Invoke && (start_ns..=end_ns).contains(&e.time_ns))
    {
        let i = match e.kind {
            EventType::Ok => 0,
            EventType::Fail => 1,
            _ => 2,
        };
        w.ops.entry(e.node.clone()).or_default()[i] += 1;
        if e.kind != EventType::Ok || e.time_ns <= grace_ns {
            continue;
        }
        let applied = e.op.is_write() && e.value == Some(Value::Done);
        let isolated = w.isolated.contains(&e.node);
        let late = (partition && isolated && applied)
            || w.unreachable.contains(&e.node)
            || (down && isolated);
        if late {
            *w.late_acks.entry(e.node.clone()).or_default() += 1;
        }
    }
    for n in w.isolated.iter().chain(&w.unreachable) {
        w.late_acks.entry(n.clone()).or_default();
    }

    // Terms and leaders from the metrics.
    w.term_before = samples
        .iter()
        .filter(|s| s.time_ns <= start_ns)
        .filter_map(|s| s.term)
        .max();
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| (start_ns..=end_ns).contains(&s.time_ns))
        .collect();
    w.term_after = during.iter().filter_map(|s| s.term).max();
    for s in &during {
        if s.is_leader == Some(true) {
            let seen = (s.node.clone(), s.term.unwrap_or(0));
            if !w.leaders.contains(&seen) {
                w.leaders.push(seen);
            }
            for (peer, age) in &s.heartbeat_age_s {
                let key = format!("{}→n{peer}", s.node);
                let m = w.heartbeat_max_s.entry(key).or_default();
                *m = m.max(*age);
            }
        }
        // A sample is stamped when its scrape starts; one started within a
        // scrape timeout of the end may have been answered after the node
        // was resumed or restarted, so it proves nothing.
        let settled = s.time_ns + (crate::monitor::SCRAPE_TIMEOUT.as_nanos() as u64) < end_ns;
        if down && w.isolated.contains(&s.node) && s.up && s.time_ns > grace_ns && settled {
            *w.late_answers.entry(s.node.clone()).or_default() += 1;
        }
    }
    if down {
        for n in &w.isolated {
            w.late_answers.entry(n.clone()).or_default();
        }
    }
    w.new_leader = during
        .iter()
        .find(|s| {
            s.is_leader == Some(true)
                && w.majority.contains(&s.node)
                && match (s.term, w.term_before) {
                    (Some(t), Some(before)) => t > before,
                    _ => Some(&s.node) != w.leader_before.as_ref(),
                }
        })
        .map(|s| {
            (
                s.node.clone(),
                s.term.unwrap_or(0),
                secs(s.time_ns.saturating_sub(start_ns)),
            )
        });

    // The checks.
    let at = format!("{} at {:.1} s", w.fault, w.start_s);
    for (node, n) in &w.late_acks {
        if *n > 0 {
            let what = if w.unreachable.contains(node) {
                "answered clients that cannot reach it"
            } else if down {
                "answered clients while down"
            } else {
                "acknowledged writes while cut off"
            };
            w.problems.push(format!(
                "{at}: {node} {what}: {n} times more than {} s after the fault",
                GRACE.as_secs()
            ));
        }
    }
    for (node, n) in &w.late_answers {
        if *n > 0 {
            w.problems.push(format!(
                "{at}: {node} still answered {n} metrics scrapes more than {} s after the {}",
                GRACE.as_secs(),
                w.fault
            ));
        }
    }
    let leader_cut = w
        .leader_before
        .as_ref()
        .is_some_and(|l| w.isolated.contains(l));
    let deadline = ELECTION_DEADLINE + INTERVAL;
    let long_enough = end_ns - start_ns >= ELECTION_DEADLINE.as_nanos() as u64;
    if partition && leader_cut && long_enough && !w.majority.is_empty() {
        let in_time = w
            .new_leader
            .as_ref()
            .is_some_and(|(_, _, after)| *after <= deadline.as_secs_f64());
        if !in_time {
            w.problems.push(format!(
                "{at}: leader {} cut off, but no new leader on the majority side ({}) within {} s",
                w.leader_before.as_deref().unwrap_or("?"),
                w.majority.join(", "),
                ELECTION_DEADLINE.as_secs()
            ));
        }
    }
    w
}

/// Every window's problems, prefixed "nemesis had no effect".
pub fn problems(windows: &[Window]) -> Vec<String> {
    windows
        .iter()
        .flat_map(|w| &w.problems)
        .map(|p| format!("nemesis had no effect: {p}"))
        .collect()
}

/// A markdown table of the windows.
pub fn table(windows: &[Window]) -> String {
    let mut out = String::from(
        "| # | fault | window (s) | cut off / down | late acks | clients' ok/fail/info by node | leader before (term) | new leader (term, after) | leaders seen | max heartbeat age | effect |\n\
         | ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (i, w) in windows.iter().enumerate() {
        let ops: Vec<String> = w
            .ops
            .iter()
            .map(|(n, [ok, fail, info])| format!("{n} {ok}/{fail}/{info}"))
            .collect();
        let late: Vec<String> = w
            .late_acks
            .iter()
            .map(|(n, k)| format!("{n} {k}"))
            .chain(
                w.late_answers
                    .iter()
                    .map(|(n, k)| format!("{n} {k} scrapes")),
            )
            .collect();
        let cut: Vec<String> = w
            .isolated
            .iter()
            .cloned()
            .chain(w.unreachable.iter().map(|n| format!("{n} (from clients)")))
            .collect();
        let leaders: Vec<String> = w.leaders.iter().map(|(n, t)| format!("{n}@{t}")).collect();
        let heartbeats: Vec<String> = w
            .heartbeat_max_s
            .iter()
            .map(|(n, a)| format!("{n} {a:.1} s"))
            .collect();
        let dash = |v: Vec<String>| {
            if v.is_empty() {
                "–".to_owned()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1}–{:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            w.fault,
            w.start_s,
            w.end_s,
            dash(cut),
            dash(late),
            dash(ops),
            match (&w.leader_before, w.term_before) {
                (Some(l), Some(t)) => format!("{l} ({t})"),
                (Some(l), None) => l.clone(),
                _ => "–".into(),
            },
            w.new_leader
                .as_ref()
                .map_or("–".into(), |(n, t, a)| format!("{n} ({t}, {a:.2} s)")),
            dash(leaders),
            dash(heartbeats),
            if w.problems.is_empty() {
                "yes".to_owned()
            } else {
                format!("**NO**: {}", w.problems.join("; "))
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn op(t: f64, node: &str, kind: EventType, value: Option<Value>) -> Event {
        Event {
            time_ns: (t * 1e9) as u64,
            process: 0,
            kind,
            mailbox: "user.a".into(),
            node: node.into(),
            op: Op::Delete,
            value,
            error: None,
        }
    }

    fn sample(t: f64, node: &str, leader: bool, term: u64) -> Sample {
        Sample {
            time_ns: (t * 1e9) as u64,
            node: node.into(),
            up: true,
            term: Some(term),
            is_leader: Some(leader),
            ..Sample::default()
        }
    }

    fn partition_leader(start: f64, stop: f64) -> Vec<NemesisEvent> {
        vec![
            NemesisEvent {
                time_ns: (start * 1e9) as u64,
                phase: "start".into(),
                fault: "partition-leader".into(),
                isolated: vec!["n1".into()],
                majority: vec!["n2".into(), "n3".into()],
                leader: Some("n1".into()),
                ..NemesisEvent::default()
            },
            NemesisEvent {
                time_ns: (stop * 1e9) as u64,
                phase: "stop".into(),
                fault: "partition-leader".into(),
                ..NemesisEvent::default()
            },
        ]
    }

    #[test]
    fn a_partition_that_cuts_has_effect() {
        let nemesis = partition_leader(10.0, 14.0);
        let events = vec![
            // In flight at the cut: acknowledged within the grace period.
            op(10.2, "n1", EventType::Ok, Some(Value::Done)),
            op(12.0, "n1", EventType::Info, None),
            op(12.0, "n2", EventType::Ok, Some(Value::Done)),
        ];
        let samples = vec![
            sample(9.9, "n1", true, 3),
            sample(10.5, "n2", false, 3),
            sample(10.9, "n2", true, 4),
        ];
        let w = analyse(&events, &nemesis, &samples);
        assert_eq!(w.len(), 1);
        assert!(w[0].problems.is_empty(), "{:?}", w[0].problems);
        assert_eq!(w[0].late_acks["n1"], 0);
        assert_eq!(w[0].ops["n1"], [1, 0, 1]);
        assert_eq!(w[0].term_before, Some(3));
        let (n, t, after) = w[0].new_leader.clone().unwrap();
        assert_eq!((n.as_str(), t), ("n2", 4));
        assert!((after - 0.9).abs() < 1e-6);
        assert!(table(&w).contains("| yes |"));
    }

    #[test]
    fn a_partition_that_cuts_nothing_fails() {
        let nemesis = partition_leader(10.0, 14.0);
        let events = vec![op(12.0, "n1", EventType::Ok, Some(Value::Done))];
        // The old leader keeps leading.
        let samples = vec![sample(9.9, "n1", true, 3), sample(12.0, "n1", true, 3)];
        let w = analyse(&events, &nemesis, &samples);
        assert_eq!(w[0].problems.len(), 2, "{:?}", w[0].problems);
        let p = problems(&w);
        assert!(p[0].starts_with(
            "nemesis had no effect: partition-leader at 10.0 s: n1 acknowledged writes"
        ));
        assert!(p[1].contains("no new leader on the majority side"));
        // A refusal is not an acknowledged write, nor is a late leader.
        let events = vec![op(
            12.0,
            "n1",
            EventType::Ok,
            Some(Value::Refused { reason: "x".into() }),
        )];
        let samples = vec![sample(9.9, "n1", true, 3), sample(12.5, "n2", true, 4)];
        let w = analyse(&events, &nemesis, &samples);
        assert_eq!(w[0].problems.len(), 1, "{:?}", w[0].problems);
        assert!(w[0].problems[0].contains("within 2 s"));
    }

    #[test]
    fn a_paused_node_that_answers_fails() {
        let nemesis = vec![
            NemesisEvent {
                time_ns: 5_000_000_000,
                phase: "start".into(),
                fault: "pause".into(),
                isolated: vec!["n2".into()],
                ..NemesisEvent::default()
            },
            NemesisEvent {
                time_ns: 8_000_000_000,
                phase: "stop".into(),
                fault: "pause".into(),
                ..NemesisEvent::default()
            },
        ];
        let down = Sample {
            time_ns: 6_500_000_000,
            node: "n2".into(),
            ..Sample::default()
        };
        let w = analyse(&[], &nemesis, std::slice::from_ref(&down));
        assert!(w[0].problems.is_empty(), "{:?}", w[0].problems);
        let up = sample(6.5, "n2", false, 3);
        let w = analyse(&[], &nemesis, &[up]);
        assert_eq!(w[0].late_answers["n2"], 1);
        assert!(w[0].problems[0].contains("still answered 1 metrics scrapes"));
        // After the window it may answer again.
        let w = analyse(&[], &nemesis, &[sample(8.5, "n2", false, 3)]);
        assert!(w[0].problems.is_empty());
    }
}
