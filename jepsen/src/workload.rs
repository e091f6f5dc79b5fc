//! The clients: each one a process of the history, keeping one operation
//! in flight over a real MUPDATE connection, recording every invocation and
//! completion.
//!
//! * `registry`: RESERVE / ACTIVATE / DEACTIVATE / DELETE / FIND on a few
//!   names, against random master nodes, so that conflicts are frequent;
//! * `ownership`: every client races to RESERVE the same fresh name for its
//!   own backend; at most one may win each;
//! * `replicas`: one writer per name ACTIVATEs versions 1, 2, 3… on the
//!   masters while readers FIND on the replicas;
//! * `lifecycle`: RESERVE → ACTIVATE → FIND (→ DELETE) on a few shared
//!   names, each sequence on one node: with small snapshots and leader
//!   partitions it provokes retried writes, and a duplicate RESERVE applied
//!   after its ACTIVATE shows as a resurrected reservation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_registry::mupdate::client::Client;
use corvid_registry::mupdate::codec::{Command, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster::Cluster;
use crate::history::{Entry, Event, EventType, Op, Value};

/// Which workloads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Conflicting operations on a small set of names.
    Registry,
    /// Backends racing to claim the same names.
    Ownership,
    /// Monotonic, converging reads on replicas.
    Replicas,
    /// Mailboxes created and activated in sequence, then read back.
    Lifecycle,
}

/// The shared, append-only history.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
    /// Completed operations (for the progress bar).
    pub completed: Arc<AtomicU64>,
}

impl Recorder {
    /// An empty history whose clock starts now.
    pub fn new(started: Instant) -> Recorder {
        Recorder {
            started,
            events: Arc::default(),
            completed: Arc::default(),
        }
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn push(&self, e: Event) {
        if let Ok(mut v) = self.events.lock() {
            v.push(e);
        }
    }

    /// Everything recorded so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Where clients connect.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `(name, mupdate address)` of every master.
    pub masters: Vec<(String, String)>,
    /// `(name, mupdate address)` of every replica.
    pub replicas: Vec<(String, String)>,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Give up on one operation (and count it indeterminate) after this.
    pub op_timeout: Duration,
    /// Names in the registry workload.
    pub mailboxes: usize,
}

/// One client process.
struct ClientProcess {
    process: u64,
    recorder: Recorder,
    settings: ClientSettings,
    conn: Option<(String, Client)>,
}

impl ClientProcess {
    /// Runs `op` on `mailbox` at `target` (name, address) and records it.
    async fn run(&mut self, target: &(String, String), mailbox: &str, op: Op) -> Option<Value> {
        let invoke = Event {
            time_ns: self.recorder.now(),
            process: self.process,
            kind: EventType::Invoke,
            mailbox: mailbox.to_owned(),
            node: target.0.clone(),
            op: op.clone(),
            value: None,
            error: None,
        };
        self.recorder.push(invoke.clone());
        let (kind, value, error) = self.execute(target, mailbox, &op).await;
        self.recorder.push(Event {
            time_ns: self.recorder.now(),
            kind,
            value: value.clone(),
            error,
            ..invoke
        });
        self.recorder.completed.fetch_add(1, Ordering::Relaxed);
        if kind != EventType::Ok {
            // A node that is down refuses at once: back off a little so
            // the history is not flooded with identical failures.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        value
    }

    async fn execute(
        &mut self,
        target: &(String, String),
        mailbox: &str,
        op: &Op,
    ) -> (EventType, Option<Value>, Option<String>) {
        let timeout = self.settings.op_timeout;
        if self.conn.as_ref().is_none_or(|(n, _)| n != &target.0) {
            self.conn = None;
            match Cluster::client(&target.1, timeout).await {
                Ok(c) => self.conn = Some((target.0.clone(), c)),
                // Nothing was sent: certainly no effect.
                Err(e) => return (EventType::Fail, None, Some(e.to_string())),
            }
        }
        let (_, client) = self.conn.as_mut().expect("connected above");
        let name = mailbox.to_owned();
        let command = match op.clone() {
            Op::Reserve { location } => Command::Reserve { name, location },
            Op::Activate { location, acl } => Command::Activate {
                name,
                location,
                acl,
            },
            Op::Deactivate { location } => Command::Deactivate { name, location },
            Op::Delete => Command::Delete { name },
            Op::Find => Command::Find { name },
        };
        let unknown = if op.is_write() {
            EventType::Info
        } else {
            EventType::Fail
        };
        let reply = match tokio::time::timeout(timeout, client.command(&command)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.conn = None;
                return (unknown, None, Some(e.to_string()));
            }
            Err(_) => {
                self.conn = None;
                return (unknown, None, Some("timed out".into()));
            }
        };
        match (reply.status, op) {
            (Status::Ok, Op::Find) => {
                let entry = reply.entries().into_iter().next().map(|e| Entry {
                    location: e.location,
                    acl: e.acl,
                    active: e.state == corvid_registry::model::MailboxState::Active,
                });
                (EventType::Ok, Some(Value::Found { entry }), None)
            }
            (Status::Ok, _) => (EventType::Ok, Some(Value::Done), None),
            (Status::No, _) if op.is_write() && crate::checker::is_model_refusal(&reply.text) => (
                EventType::Ok,
                Some(Value::Refused {
                    reason: reply.text.clone(),
                }),
                None,
            ),
            (_, _) => (unknown, None, Some(reply.text.clone())),
        }
    }
}

/// One client's assignment.
pub struct ClientPlan {
    /// Its process number in the history.
    pub process: u64,
    /// What it does.
    pub workload: Workload,
    /// How many clients run this workload.
    pub clients_of_workload: u64,
    /// Where it connects.
    pub targets: Targets,
    /// Timeouts and sizes.
    pub settings: ClientSettings,
    /// The run's seed.
    pub seed: u64,
    /// When to stop.
    pub until: Instant,
}

/// Runs one client until its plan's end, recording into `recorder`.
pub async fn client(plan: ClientPlan, recorder: Recorder) {
    let ClientPlan {
        process,
        workload,
        clients_of_workload,
        targets,
        settings,
        seed,
        until,
    } = plan;
    let mut rng = StdRng::seed_from_u64(seed ^ process.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut me = ClientProcess {
        process,
        recorder,
        settings: settings.clone(),
        conn: None,
    };
    let backends = ["be1!default", "be2!default", "be3!default"];
    let mut version = 0u64;
    // Replica writers each own one name; readers read them all.
    let rank = process % clients_of_workload.max(1);
    while Instant::now() < until {
        match workload {
            Workload::Registry => {
                let target = &targets.masters[rng.gen_range(0..targets.masters.len())];
                let mailbox = format!("user.j{}", rng.gen_range(0..settings.mailboxes));
                let location = backends[rng.gen_range(0..backends.len())].to_owned();
                let op = match rng.gen_range(0..10) {
                    0 | 1 => Op::Reserve { location },
                    2 | 3 => Op::Activate {
                        location,
                        acl: format!("u{}\tlrs\t", rng.gen_range(0..4)),
                    },
                    4 => Op::Deactivate { location },
                    5 => Op::Delete,
                    _ => Op::Find,
                };
                me.run(target, &mailbox, op).await;
            }
            Workload::Lifecycle => {
                let target = &targets.masters[rng.gen_range(0..targets.masters.len())];
                let mailbox = format!("user.life{}", rng.gen_range(0..settings.mailboxes));
                let location = backends[rng.gen_range(0..backends.len())].to_owned();
                let acl = format!("u{}\tlrs\t", rng.gen_range(0..4));
                me.run(
                    target,
                    &mailbox,
                    Op::Reserve {
                        location: location.clone(),
                    },
                )
                .await;
                me.run(target, &mailbox, Op::Activate { location, acl })
                    .await;
                me.run(target, &mailbox, Op::Find).await;
                if rng.gen_bool(0.5) {
                    me.run(target, &mailbox, Op::Delete).await;
                }
            }
            Workload::Ownership => {
                // Every client claims the same name in the same 200 ms slot.
                let slot = me.recorder.now() / 200_000_000;
                let mailbox = format!("user.own{slot}");
                let target = &targets.masters[rng.gen_range(0..targets.masters.len())];
                let location = format!("be{}!default", process);
                me.run(target, &mailbox, Op::Reserve { location }).await;
                me.run(target, &mailbox, Op::Find).await;
                let next = (slot + 1) * 200_000_000;
                let wait = next.saturating_sub(me.recorder.now());
                tokio::time::sleep(Duration::from_nanos(wait)).await;
            }
            Workload::Replicas => {
                if rank < 2 || targets.replicas.is_empty() {
                    // A writer: versions of its own name, in order.
                    let target = &targets.masters[rng.gen_range(0..targets.masters.len())];
                    let mailbox = format!("user.rep{rank}");
                    let op = Op::Activate {
                        location: "be1!default".into(),
                        acl: format!("v{}", version + 1),
                    };
                    // Whatever the outcome, the next version is larger than
                    // anything this writer may have written.
                    me.run(target, &mailbox, op).await;
                    version += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                } else {
                    let target = &targets.replicas[rng.gen_range(0..targets.replicas.len())];
                    let mailbox = format!("user.rep{}", rng.gen_range(0..2));
                    me.run(target, &mailbox, Op::Find).await;
                    // Local reads are fast; pace them so the history stays
                    // a size the checker and the plots handle.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}
