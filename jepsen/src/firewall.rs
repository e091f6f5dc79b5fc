//! Partitions: iptables DROP rules inside the node namespaces.
//!
//! Each process has its own namespace and address (see [`crate::netns`]),
//! so a rule `INPUT -s <peer> -j DROP` in a node's namespace drops every
//! packet that peer sends it, whatever socket it came from: Raft, the
//! replica stream, forwarded writes. A cut puts such a rule on both sides.
//! Nothing is dropped on OUTPUT, so a cut looks like a silent network (a
//! connection attempt times out) rather than an error.

use std::collections::BTreeSet;

use crate::cluster::{system_tool, Process};
use crate::netns::CLIENT_IP;

/// The rules in force, by namespace.
#[derive(Default)]
pub struct Firewall {
    /// Namespaces that have rules.
    touched: BTreeSet<String>,
    /// `a->b` for "packets from a to b are dropped", for the history.
    rules: Vec<String>,
}

impl Firewall {
    /// Drops every packet between `a` and `b`, both ways.
    pub fn cut(&mut self, a: &Process, b: &Process) -> anyhow::Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            self.drop_in(to, &["-s", &from.ip])?;
            self.rules.push(format!("{}->{}", from.name, to.name));
        }
        Ok(())
    }

    /// Drops the harness's clients' MUPDATE packets to `p` (the harness's
    /// own administration and metrics requests still reach it).
    pub fn cut_clients(&mut self, p: &Process) -> anyhow::Result<()> {
        self.drop_in(p, &["-s", CLIENT_IP, "-p", "tcp", "--dport", "3905"])?;
        self.rules.push(format!("clients->{}", p.name));
        Ok(())
    }

    fn drop_in(&mut self, p: &Process, matches: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-w", "5", "-A", "INPUT"];
        args.extend_from_slice(matches);
        args.extend(["-j", "DROP"]);
        iptables_in(&p.netns, &args)?;
        self.touched.insert(p.netns.clone());
        Ok(())
    }

    /// Removes every rule (flushes INPUT in every namespace that has one).
    /// Goes on after an error; returns the first.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.rules.clear();
        let mut first = Ok(());
        for ns in std::mem::take(&mut self.touched) {
            if let Err(e) = iptables_in(&ns, &["-w", "5", "-F", "INPUT"]) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// The rules in force, for the history (`n1->n2` drops what n1 sends
    /// n2).
    pub fn describe(&self) -> String {
        self.rules.join(" ")
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = self.heal();
    }
}

fn iptables_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, "iptables"];
    all.extend_from_slice(args);
    system_tool("ip", &all, "iproute2 and Debian package iptables")
}
