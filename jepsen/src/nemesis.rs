//! The nemesis: faults on a schedule, each held for a bounded time and then
//! healed, every start and stop recorded. Whatever happens (an error, the
//! end of the run), [`Nemesis::heal_all`] removes every rule, resumes every
//! paused process, restarts every killed one and re-adds removed members.

use std::time::{Duration, Instant};

use corvid_registry::peer::AdminRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::{Cluster, Firewall};
use crate::history::NemesisEvent;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Network partitions: random halves, isolated leader, majority ring,
    /// bridge.
    Partition,
    /// kill -9 of a node, restarted when the fault ends.
    Kill,
    /// SIGSTOP of a node, SIGCONT when the fault ends.
    Pause,
    /// Remove a voter from the membership, re-add it when the fault ends.
    Membership,
}

/// The nemesis's state: what is broken now.
pub struct Nemesis {
    firewall: Firewall,
    /// The partition in force, if any.
    partition: Option<String>,
    killed: Vec<String>,
    paused: Vec<String>,
    /// Recorded events.
    pub events: Vec<NemesisEvent>,
    started: Instant,
}

impl Nemesis {
    /// A nemesis whose clock starts at `started` (the history's).
    pub fn new(started: Instant) -> Nemesis {
        Nemesis {
            firewall: Firewall::default(),
            partition: None,
            killed: Vec::new(),
            paused: Vec::new(),
            events: Vec::new(),
            started,
        }
    }

    fn record(&mut self, phase: &str, fault: &str, detail: String) {
        tracing::info!(phase, fault, %detail, "nemesis");
        self.events.push(NemesisEvent {
            time_ns: self.started.elapsed().as_nanos() as u64,
            phase: phase.into(),
            fault: fault.into(),
            detail,
        });
    }

    /// Starts one fault of kind `fault`; returns its name for [`Nemesis::stop`].
    pub async fn start(
        &mut self,
        cluster: &mut Cluster,
        fault: Fault,
        rng: &mut StdRng,
    ) -> anyhow::Result<String> {
        let ips: Vec<String> = cluster.nodes.iter().map(|n| n.ip.clone()).collect();
        match fault {
            Fault::Partition => {
                let leader = cluster.leader(Duration::from_secs(2)).await;
                let mut order = ips.clone();
                order.shuffle(rng);
                // A ring needs five nodes: with three, every node is its
                // neighbours' neighbour and nothing would be cut.
                let kinds: &[&str] = if ips.len() >= 5 {
                    &[
                        "partition-halves",
                        "partition-leader",
                        "partition-ring",
                        "partition-bridge",
                    ]
                } else {
                    &["partition-halves", "partition-leader", "partition-bridge"]
                };
                let kind = kinds[rng.gen_range(0..kinds.len())];
                let cuts: Vec<(String, String)> = match kind {
                    "partition-leader" => {
                        let l = leader
                            .and_then(|id| cluster.node(id))
                            .map_or_else(|| order[0].clone(), |n| n.ip.clone());
                        ips.iter()
                            .filter(|ip| **ip != l)
                            .map(|ip| (l.clone(), ip.clone()))
                            .collect()
                    }
                    "partition-ring" => {
                        // Each node reaches only its ring neighbours: every
                        // node sees a majority, no two see the same one.
                        let n = order.len();
                        let mut cuts = Vec::new();
                        for i in 0..n {
                            for j in i + 1..n {
                                let d = (j - i).min(n - (j - i));
                                if d > 1 {
                                    cuts.push((order[i].clone(), order[j].clone()));
                                }
                            }
                        }
                        cuts
                    }
                    "partition-bridge" => {
                        // Two halves joined by one node (order[0]) that
                        // sees both.
                        let rest = &order[1..];
                        let (a, b) = rest.split_at(rest.len() / 2);
                        a.iter()
                            .flat_map(|x| b.iter().map(move |y| (x.clone(), y.clone())))
                            .collect()
                    }
                    _ => {
                        let (a, b) = order.split_at(order.len() / 2);
                        a.iter()
                            .flat_map(|x| b.iter().map(move |y| (x.clone(), y.clone())))
                            .collect()
                    }
                };
                for (a, b) in &cuts {
                    self.firewall.cut(a, b)?;
                }
                let detail = self.firewall.describe();
                self.partition = Some(kind.to_owned());
                self.record("start", kind, detail);
                Ok(kind.into())
            }
            Fault::Kill | Fault::Pause => {
                let candidates: Vec<String> = cluster
                    .nodes
                    .iter()
                    .filter(|n| n.running() && !n.paused)
                    .map(|n| n.name.clone())
                    .collect();
                // Never more than a minority down at once.
                let down = self.killed.len() + self.paused.len();
                if down + 1 > (cluster.nodes.len() - 1) / 2 || candidates.is_empty() {
                    return Ok(String::new());
                }
                // Prefer the leader half of the time: that is where it hurts.
                let leader = cluster.leader(Duration::from_secs(1)).await;
                let victim = match leader.and_then(|id| cluster.node(id)) {
                    Some(l) if rng.gen_bool(0.5) => l.name.clone(),
                    _ => candidates[rng.gen_range(0..candidates.len())].clone(),
                };
                let p = cluster
                    .nodes
                    .iter_mut()
                    .find(|n| n.name == victim)
                    .expect("a node");
                if fault == Fault::Kill {
                    p.kill();
                    self.killed.push(victim.clone());
                    self.record("start", "kill", victim);
                    Ok("kill".into())
                } else {
                    p.pause();
                    self.paused.push(victim.clone());
                    self.record("start", "pause", victim);
                    Ok("pause".into())
                }
            }
            Fault::Membership => {
                let leader = cluster.leader(Duration::from_secs(2)).await;
                let candidates: Vec<u64> = cluster
                    .nodes
                    .iter()
                    .filter(|n| Some(n.id) != leader && !cluster.removed.contains(&n.id))
                    .map(|n| n.id)
                    .collect();
                if !cluster.removed.is_empty() || candidates.is_empty() {
                    return Ok(String::new());
                }
                let id = candidates[rng.gen_range(0..candidates.len())];
                cluster.membership(AdminRequest::Remove { id }).await?;
                cluster.removed.push(id);
                self.record("start", "membership", format!("removed node {id}"));
                Ok("membership".into())
            }
        }
    }

    /// Ends the fault started as `name`.
    pub async fn stop(&mut self, cluster: &mut Cluster, name: &str) -> anyhow::Result<()> {
        match name {
            "" => Ok(()),
            n if n.starts_with("partition") => {
                self.firewall.heal()?;
                if let Some(kind) = self.partition.take() {
                    self.record("stop", &kind, "healed".into());
                }
                Ok(())
            }
            "kill" => {
                for victim in std::mem::take(&mut self.killed) {
                    cluster.restart(&victim)?;
                    self.record("stop", "kill", format!("restarted {victim}"));
                }
                Ok(())
            }
            "pause" => {
                for victim in std::mem::take(&mut self.paused) {
                    if let Some(p) = cluster.nodes.iter_mut().find(|n| n.name == victim) {
                        p.resume();
                    }
                    self.record("stop", "pause", format!("resumed {victim}"));
                }
                Ok(())
            }
            "membership" => {
                for id in std::mem::take(&mut cluster.removed) {
                    let addr = cluster.node(id).map(|n| n.peer()).unwrap_or_default();
                    cluster
                        .membership(AdminRequest::AddLearner { id, addr })
                        .await?;
                    cluster.membership(AdminRequest::Promote { id }).await?;
                    self.record("stop", "membership", format!("re-added node {id}"));
                }
                Ok(())
            }
            other => anyhow::bail!("unknown fault {other}"),
        }
    }

    /// Heals everything, whatever is broken. Errors are logged, not
    /// returned: healing goes on.
    pub async fn heal_all(&mut self, cluster: &mut Cluster) {
        for name in ["partition", "pause", "kill", "membership"] {
            let broken = match name {
                "partition" => true,
                "pause" => !self.paused.is_empty(),
                "kill" => !self.killed.is_empty(),
                _ => !cluster.removed.is_empty(),
            };
            if !broken {
                continue;
            }
            // Membership changes need a leader: retry for a while.
            for attempt in 0..20 {
                match self.stop(cluster, name).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(attempt, "healing {name}: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}
