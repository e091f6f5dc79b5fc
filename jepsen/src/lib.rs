//! Corvid's Jepsen-style harness: a real registry cluster in a private
//! network namespace, real MUPDATE clients, nemeses (partitions, kills,
//! pauses, membership changes), a recorded history and a checker.
//!
//! * [`history`]: the events a run records (JSON lines).
//! * [`checker`]: linearizability per mailbox and the other safety checks.
//! * [`report`]: plots and the terminal summary.
//! * [`netns`], [`firewall`]: a network namespace per node, and partitions
//!   as DROP rules inside them.
//! * [`monitor`], [`evidence`]: the nodes' Raft metrics during the run,
//!   and per fault window the proof that the fault had its effect.
//! * [`powerfs`]: a FUSE disk that forgets what was never fsynced, for
//!   the power-loss fault.
//! * [`cluster`], [`workload`], [`nemesis`], [`run`]: the processes, the
//!   clients, the faults and one run from start to verdict.

pub mod checker;
pub mod cluster;
pub mod evidence;
pub mod firewall;
pub mod history;
pub mod monitor;
pub mod nemesis;
pub mod netns;
pub mod powerfs;
pub mod report;
pub mod run;
pub mod workload;
