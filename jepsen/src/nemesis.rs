//! The nemesis: faults on a schedule, each held for a bounded time and then
//! healed, every start and stop recorded. Whatever happens (an error, the
//! end of the run), [`Nemesis::heal_all`] removes every rule, resumes every
//! paused process, restarts every killed one and re-adds removed members.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use corvid_registry::peer::AdminRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::Cluster;
use crate::firewall::Firewall;
use crate::history::NemesisEvent;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Network partitions between the nodes: random halves, isolated
    /// leader, majority ring, bridge. Clients still reach every node.
    Partition,
    /// Random halves of the nodes, and the clients reach only the
    /// minority side.
    ClientPartition,
    /// kill -9 of a node, restarted when the fault ends.
    Kill,
    /// SIGSTOP of a node, SIGCONT when the fault ends.
    Pause,
    /// Remove a voter from the membership, re-add it when the fault ends.
    Membership,
    /// Cut the master a replica follows from the other masters, but not
    /// from the replica: the replica must move to a master of the majority
    /// and keep up with new writes.
    ReplicaMaster,
    /// A replica killed, paused, or cut from every master.
    Replica,
    /// Two faults at once, with five or more masters: one node killed and
    /// another cut off (the leader half of the time), leaving a majority
    /// that can still elect.
    Double,
    /// Only the partition that cuts the current leader off from everyone
    /// else (clients still reach it).
    PartitionLeader,
    /// No fault: `--nemesis none`, for a run that differs from another only
    /// by its fault.
    None,
    /// Every master loses power at once: SIGKILL, every write its disk
    /// never fsynced is dropped (see [`crate::powerfs`]), restarted when
    /// the fault ends.
    PowerLoss,
}

/// How long a replica may take to follow a majority master after its own
/// was cut off: the master's heartbeat says "no leader" after about an
/// election, the harness's `leaderless_timeout_ms` is 1.5 s, plus slack.
const REPLICA_FAILOVER: Duration = Duration::from_secs(4);

impl Fault {
    /// The shortest time this fault is held: long enough for its effect to
    /// show (a replica's failover takes seconds).
    pub fn min_hold(self) -> Duration {
        match self {
            Fault::ReplicaMaster => REPLICA_FAILOVER + Duration::from_secs(2),
            _ => Duration::from_secs(2),
        }
    }
}

/// A partition to make: which processes are cut from which, and from the
/// clients.
#[derive(Debug, Default, Clone, PartialEq)]
struct Plan {
    kind: &'static str,
    /// Pairs of process names that cannot reach each other.
    cuts: Vec<(String, String)>,
    /// Processes the clients cannot reach.
    unreachable: Vec<String>,
}

/// Picks a partition among `masters` (names, any order) and `replicas`;
/// `leader` is the current leader, if known. With `clients` the masters are
/// split in halves and the clients reach only the smaller one.
fn plan_partition(
    masters: &[String],
    replicas: &[String],
    leader: Option<&str>,
    clients: bool,
    only_leader: bool,
    rng: &mut StdRng,
) -> Plan {
    let mut order = masters.to_vec();
    order.shuffle(rng);
    // Each replica follows one side of a split (its stream to the other
    // side's masters is cut with the rest).
    let split = |a: &[String], b: &[String], rng: &mut StdRng| {
        let mut a = a.to_vec();
        let mut b = b.to_vec();
        for r in replicas {
            if rng.gen_bool(0.5) {
                a.push(r.clone());
            } else {
                b.push(r.clone());
            }
        }
        (a, b)
    };
    let across = |a: &[String], b: &[String]| -> Vec<(String, String)> {
        a.iter()
            .flat_map(|x| b.iter().map(move |y| (x.clone(), y.clone())))
            .collect()
    };
    if clients {
        let (small, big) = order.split_at(order.len() / 2);
        let (small, big) = split(small, big, rng);
        return Plan {
            kind: "partition-clients",
            cuts: across(&small, &big),
            unreachable: big,
        };
    }
    // A ring needs five nodes: with three, every node is its neighbours'
    // neighbour and nothing would be cut.
    let kinds: &[&'static str] = if masters.len() >= 5 {
        &[
            "partition-halves",
            "partition-leader",
            "partition-ring",
            "partition-bridge",
        ]
    } else {
        &["partition-halves", "partition-leader", "partition-bridge"]
    };
    let kind = if only_leader {
        "partition-leader"
    } else {
        kinds[rng.gen_range(0..kinds.len())]
    };
    let cuts = match kind {
        "partition-leader" => {
            // The leader alone; replicas stay with the majority.
            let l = leader.map_or_else(|| order[0].clone(), str::to_owned);
            let rest: Vec<String> = masters
                .iter()
                .chain(replicas)
                .filter(|n| **n != l)
                .cloned()
                .collect();
            across(&[l], &rest)
        }
        "partition-ring" => {
            // Each node reaches only its ring neighbours: every node sees
            // a majority, no two see the same one.
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
            // Two halves joined by one node (order[0]) that sees both.
            let rest = &order[1..];
            let (a, b) = rest.split_at(rest.len() / 2);
            across(a, b)
        }
        _ => {
            let (a, b) = order.split_at(order.len() / 2);
            let (a, b) = split(a, b, rng);
            across(&a, &b)
        }
    };
    Plan {
        kind,
        cuts,
        unreachable: Vec::new(),
    }
}

/// The masters cut off from a majority of the masters (counting
/// themselves), and the others if they all reach each other (the side that
/// can elect), else nothing.
fn sides(masters: &[String], cuts: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let cut: BTreeSet<(&str, &str)> = cuts
        .iter()
        .flat_map(|(a, b)| [(a.as_str(), b.as_str()), (b.as_str(), a.as_str())])
        .collect();
    let quorum = masters.len() / 2 + 1;
    let reach = |m: &str| {
        masters
            .iter()
            .filter(|o| !cut.contains(&(m, o.as_str())))
            .count()
    };
    let (isolated, rest): (Vec<String>, Vec<String>) =
        masters.iter().cloned().partition(|m| reach(m) < quorum);
    let connected = rest.iter().all(|a| {
        rest.iter()
            .all(|b| !cut.contains(&(a.as_str(), b.as_str())))
    });
    let majority = if connected && rest.len() >= quorum {
        rest
    } else {
        Vec::new()
    };
    let mut isolated = isolated;
    isolated.sort();
    (isolated, majority)
}

/// The nemesis's state: what is broken now.
pub struct Nemesis {
    firewall: Firewall,
    /// The partition in force, if any.
    partition: Option<String>,
    killed: Vec<String>,
    paused: Vec<String>,
    /// A replica-master partition in force: the replica and the leader's
    /// applied index when it began.
    replica_watch: Option<(String, u64)>,
    /// Masters down after a power loss.
    powered_off: Vec<String>,
    /// Recorded events.
    pub events: Vec<NemesisEvent>,
    /// Faults whose expected effect did not show (the replica did not fail
    /// over); they fail the run.
    pub problems: Vec<String>,
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
            replica_watch: None,
            powered_off: Vec::new(),
            events: Vec::new(),
            problems: Vec::new(),
            started,
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn record(&mut self, event: NemesisEvent) {
        tracing::info!(phase = event.phase, fault = event.fault, detail = %event.detail, "nemesis");
        self.events.push(event);
    }

    /// Records a fault now in force.
    fn record_start(&mut self, event: NemesisEvent) {
        let time_ns = self.now();
        self.record(NemesisEvent {
            time_ns,
            phase: "start".into(),
            ..event
        });
    }

    /// Records the end of a fault at `time_ns` (taken before healing it).
    fn record_stop(&mut self, time_ns: u64, fault: &str, detail: String) {
        self.record(NemesisEvent {
            time_ns,
            phase: "stop".into(),
            fault: fault.into(),
            detail,
            ..NemesisEvent::default()
        });
    }

    /// Starts one fault of kind `fault`; returns its name for [`Nemesis::stop`].
    pub async fn start(
        &mut self,
        cluster: &mut Cluster,
        fault: Fault,
        rng: &mut StdRng,
    ) -> anyhow::Result<String> {
        let leader = cluster
            .leader(Duration::from_secs(2))
            .await
            .and_then(|id| cluster.node(id))
            .map(|n| n.name.clone());
        match fault {
            Fault::Partition | Fault::ClientPartition | Fault::PartitionLeader => {
                let masters: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
                let replicas: Vec<String> =
                    cluster.replicas.iter().map(|r| r.name.clone()).collect();
                let plan = plan_partition(
                    &masters,
                    &replicas,
                    leader.as_deref(),
                    fault == Fault::ClientPartition,
                    fault == Fault::PartitionLeader,
                    rng,
                );
                let by_name: BTreeMap<&str, &crate::cluster::Process> = cluster
                    .nodes
                    .iter()
                    .chain(&cluster.replicas)
                    .map(|p| (p.name.as_str(), p))
                    .collect();
                for (a, b) in &plan.cuts {
                    self.firewall
                        .cut(by_name[a.as_str()], by_name[b.as_str()])?;
                }
                for p in &plan.unreachable {
                    self.firewall.cut_clients(by_name[p.as_str()])?;
                }
                let (isolated, majority) = sides(&masters, &plan.cuts);
                let detail = self.firewall.describe();
                self.partition = Some(plan.kind.to_owned());
                self.record_start(NemesisEvent {
                    fault: plan.kind.into(),
                    detail,
                    isolated,
                    majority,
                    unreachable: plan.unreachable,
                    leader,
                    ..NemesisEvent::default()
                });
                Ok(plan.kind.into())
            }
            Fault::Kill | Fault::Pause => {
                let candidates = up_masters(cluster);
                // Never more than a minority down at once.
                let down = self.killed.len() + self.paused.len();
                if down + 1 > (cluster.nodes.len() - 1) / 2 || candidates.is_empty() {
                    return Ok(String::new());
                }
                // Prefer the leader half of the time: that is where it hurts.
                let victim = match &leader {
                    Some(l) if candidates.contains(l) && rng.gen_bool(0.5) => l.clone(),
                    _ => candidates[rng.gen_range(0..candidates.len())].clone(),
                };
                let majority = cluster
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .filter(|n| *n != victim)
                    .collect();
                let event = NemesisEvent {
                    detail: victim.clone(),
                    isolated: vec![victim.clone()],
                    majority,
                    leader,
                    ..NemesisEvent::default()
                };
                let p = cluster
                    .nodes
                    .iter_mut()
                    .find(|n| n.name == victim)
                    .expect("a node");
                let name = if fault == Fault::Kill {
                    p.kill();
                    self.killed.push(victim);
                    "kill"
                } else {
                    p.pause();
                    self.paused.push(victim);
                    "pause"
                };
                self.record_start(NemesisEvent {
                    fault: name.into(),
                    ..event
                });
                Ok(name.into())
            }
            Fault::ReplicaMaster => self.start_replica_master(cluster, leader).await,
            Fault::Replica => self.start_replica(cluster, leader, rng),
            Fault::Double => self.start_double(cluster, leader, rng),
            Fault::None => Ok(String::new()),
            Fault::PowerLoss => {
                anyhow::ensure!(
                    cluster.has_power_disks(),
                    "power-loss needs the masters on power-loss disks"
                );
                if !self.killed.is_empty() || !self.paused.is_empty() {
                    return Ok(String::new());
                }
                let all: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
                let time_ns = self.now();
                let mut lost = Vec::new();
                for name in &all {
                    if let Some(p) = cluster.nodes.iter_mut().find(|n| n.name == *name) {
                        p.kill();
                    }
                }
                for name in &all {
                    let (files, bytes) = cluster.power_cut(name)?;
                    lost.push(format!("{name}: {bytes} unsynced bytes in {files} files"));
                }
                self.powered_off = all.clone();
                self.record(NemesisEvent {
                    time_ns,
                    phase: "start".into(),
                    fault: "power-loss".into(),
                    detail: lost.join("; "),
                    isolated: all,
                    leader,
                    ..NemesisEvent::default()
                });
                Ok("power-loss".into())
            }
            Fault::Membership => {
                let candidates: Vec<u64> = cluster
                    .nodes
                    .iter()
                    .filter(|n| {
                        Some(&n.name) != leader.as_ref() && !cluster.removed.contains(&n.id)
                    })
                    .map(|n| n.id)
                    .collect();
                if !cluster.removed.is_empty() || candidates.is_empty() {
                    return Ok(String::new());
                }
                let id = candidates[rng.gen_range(0..candidates.len())];
                cluster.membership(AdminRequest::Remove { id }).await?;
                cluster.removed.push(id);
                self.record_start(NemesisEvent {
                    fault: "membership".into(),
                    detail: format!("removed node {id}"),
                    leader,
                    ..NemesisEvent::default()
                });
                Ok("membership".into())
            }
        }
    }

    /// Ends the fault started as `name`.
    pub async fn stop(&mut self, cluster: &mut Cluster, name: &str) -> anyhow::Result<()> {
        let now = self.now();
        match name {
            "" => Ok(()),
            "double" => {
                let partition = Box::pin(self.stop(cluster, "partition")).await;
                Box::pin(self.stop(cluster, "kill")).await.and(partition)
            }
            n if n.starts_with("partition") => {
                if let Some((replica, before)) = self.replica_watch.take() {
                    self.check_replica_failover(cluster, &replica, before).await;
                }
                if let Some(kind) = self.partition.take() {
                    self.record_stop(now, &kind, "healed".into());
                }
                self.firewall.heal()
            }
            "kill" => {
                while let Some(victim) = self.killed.pop() {
                    self.record_stop(now, "kill", format!("restarted {victim}"));
                    if let Err(e) = cluster.restart(&victim) {
                        // Still down: healing tries again.
                        self.killed.push(victim);
                        return Err(e);
                    }
                }
                Ok(())
            }
            "power-loss" => {
                while let Some(victim) = self.powered_off.pop() {
                    if let Err(e) = cluster.restart(&victim) {
                        self.powered_off.push(victim);
                        return Err(e);
                    }
                }
                self.record_stop(now, "power-loss", "power back on every master".into());
                Ok(())
            }
            "pause" => {
                for victim in std::mem::take(&mut self.paused) {
                    self.record_stop(now, "pause", format!("resumed {victim}"));
                    if let Some(p) = cluster
                        .nodes
                        .iter_mut()
                        .chain(cluster.replicas.iter_mut())
                        .find(|n| n.name == victim)
                    {
                        p.resume();
                    }
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
                    self.record_stop(now, "membership", format!("re-added node {id}"));
                }
                Ok(())
            }
            other => anyhow::bail!("unknown fault {other}"),
        }
    }

    /// Cuts the master that a replica follows (the one with a log stream
    /// open) from the other masters.
    async fn start_replica_master(
        &mut self,
        cluster: &mut Cluster,
        leader: Option<String>,
    ) -> anyhow::Result<String> {
        let Some(replica) = cluster.replicas.first().map(|r| r.name.clone()) else {
            return Ok(String::new());
        };
        let mut followed = None;
        for n in cluster.nodes.iter().filter(|n| n.running() && !n.paused) {
            let page = crate::monitor::scrape(&n.metrics())
                .await
                .unwrap_or_default();
            if crate::monitor::metric(&page, "corvid_stream_followers").unwrap_or(0.0) >= 1.0 {
                followed = Some(n.name.clone());
                break;
            }
        }
        let Some(followed) = followed else {
            return Ok(String::new());
        };
        let before = leader_applied(cluster).await.unwrap_or(0);
        let others: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| *n != followed)
            .collect();
        for o in &others {
            let (a, b) = (
                cluster.nodes.iter().find(|n| n.name == followed),
                cluster.nodes.iter().find(|n| n.name == *o),
            );
            if let (Some(a), Some(b)) = (a, b) {
                self.firewall.cut(a, b)?;
            }
        }
        let kind = "partition-replica-master";
        self.partition = Some(kind.into());
        self.replica_watch = Some((replica.clone(), before));
        self.record_start(NemesisEvent {
            fault: kind.into(),
            detail: format!("{replica} follows {followed}; {}", self.firewall.describe()),
            isolated: vec![followed],
            majority: others,
            leader,
            ..NemesisEvent::default()
        });
        Ok(kind.into())
    }

    /// Before healing a replica-master partition: the replica must have
    /// applied, from a majority master, what the cluster committed by now.
    async fn check_replica_failover(&mut self, cluster: &Cluster, replica: &str, before: u64) {
        let Some(target) = leader_applied(cluster).await else {
            return;
        };
        if target <= before {
            return; // nothing was written meanwhile: nothing to show
        }
        let Some(r) = cluster.replicas.iter().find(|r| r.name == replica) else {
            return;
        };
        let deadline = Instant::now() + REPLICA_FAILOVER;
        let mut applied = 0.0;
        while Instant::now() < deadline {
            let page = crate::monitor::scrape(&r.metrics())
                .await
                .unwrap_or_default();
            applied = crate::monitor::metric(&page, "corvid_replica_applied_index").unwrap_or(0.0);
            if applied >= target as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.problems.push(format!(
            "nemesis had no effect: replica {replica} did not move to a majority master \
             (applied {applied}, the cluster had committed {target})"
        ));
    }

    /// Kills, pauses, or cuts from every master, one replica.
    fn start_replica(
        &mut self,
        cluster: &mut Cluster,
        leader: Option<String>,
        rng: &mut StdRng,
    ) -> anyhow::Result<String> {
        let candidates: Vec<usize> = (0..cluster.replicas.len())
            .filter(|&i| cluster.replicas[i].running() && !cluster.replicas[i].paused)
            .collect();
        if candidates.is_empty() || self.partition.is_some() {
            return Ok(String::new());
        }
        let i = candidates[rng.gen_range(0..candidates.len())];
        let victim = cluster.replicas[i].name.clone();
        let event = NemesisEvent {
            detail: format!("replica {victim}"),
            isolated: vec![victim.clone()],
            leader,
            ..NemesisEvent::default()
        };
        let name = match rng.gen_range(0..3) {
            0 => {
                cluster.replicas[i].kill();
                self.killed.push(victim);
                "kill"
            }
            1 => {
                cluster.replicas[i].pause();
                self.paused.push(victim);
                "pause"
            }
            _ => {
                for n in &cluster.nodes {
                    self.firewall.cut(&cluster.replicas[i], n)?;
                }
                self.partition = Some("partition-replica".into());
                "partition-replica"
            }
        };
        self.record_start(NemesisEvent {
            fault: name.into(),
            ..event
        });
        Ok(name.into())
    }

    /// One node killed and another cut off from everybody: with five
    /// masters three remain, a majority that can elect.
    fn start_double(
        &mut self,
        cluster: &mut Cluster,
        leader: Option<String>,
        rng: &mut StdRng,
    ) -> anyhow::Result<String> {
        let running = up_masters(cluster);
        let down = self.killed.len() + self.paused.len();
        if cluster.nodes.len() < 5 || down > 0 || running.len() < cluster.nodes.len() {
            return Ok(String::new());
        }
        let mut order = running.clone();
        order.shuffle(rng);
        // The one cut off is the leader half of the time; the one killed
        // never is (the partition is what should move leadership).
        let cut = match &leader {
            Some(l) if rng.gen_bool(0.5) => l.clone(),
            _ => order[0].clone(),
        };
        let victim = order
            .iter()
            .find(|n| **n != cut && Some(*n) != leader.as_ref())
            .cloned()
            .expect("five running masters");
        let majority: Vec<String> = running
            .iter()
            .filter(|n| **n != cut && **n != victim)
            .cloned()
            .collect();
        if let Some(p) = cluster.nodes.iter_mut().find(|n| n.name == victim) {
            p.kill();
        }
        self.killed.push(victim.clone());
        self.record_start(NemesisEvent {
            fault: "kill".into(),
            detail: victim.clone(),
            isolated: vec![victim.clone()],
            majority: majority.clone(),
            leader: leader.clone(),
            ..NemesisEvent::default()
        });
        let cut_p = cluster
            .nodes
            .iter()
            .find(|n| n.name == cut)
            .expect("a node");
        for other in cluster
            .nodes
            .iter()
            .chain(&cluster.replicas)
            .filter(|o| o.name != cut)
        {
            self.firewall.cut(cut_p, other)?;
        }
        let kind = "partition-double";
        self.partition = Some(kind.into());
        self.record_start(NemesisEvent {
            fault: kind.into(),
            detail: format!("{} with {victim} killed", self.firewall.describe()),
            isolated: vec![cut],
            majority,
            leader,
            ..NemesisEvent::default()
        });
        Ok("double".into())
    }

    /// Heals everything, whatever is broken. Errors are logged, not
    /// returned: healing goes on.
    pub async fn heal_all(&mut self, cluster: &mut Cluster) {
        for name in ["partition", "pause", "kill", "power-loss", "membership"] {
            let broken = match name {
                "partition" => true,
                "pause" => !self.paused.is_empty(),
                "kill" => !self.killed.is_empty(),
                "power-loss" => !self.powered_off.is_empty(),
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

/// The masters running and not paused.
fn up_masters(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .filter(|n| n.running() && !n.paused)
        .map(|n| n.name.clone())
        .collect()
}

/// The applied index of the leader, as its metrics say.
async fn leader_applied(cluster: &Cluster) -> Option<u64> {
    let id = cluster.leader(Duration::from_secs(2)).await?;
    let page = crate::monitor::scrape(&cluster.node(id)?.metrics()).await?;
    crate::monitor::metric(&page, "corvid_raft_applied_index").map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sides_find_the_cut_off_masters_and_the_majority() {
        let masters = names(&["n1", "n2", "n3"]);
        let cut = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect()
        };
        // The leader alone (replica r1 with the majority).
        let (isolated, majority) =
            sides(&masters, &cut(&[("n1", "n2"), ("n1", "n3"), ("n1", "r1")]));
        assert_eq!((isolated, majority), (names(&["n1"]), names(&["n2", "n3"])));
        // A bridge: everybody still reaches a majority, nobody is cut off
        // and no side is a clique.
        let (isolated, majority) = sides(&masters, &cut(&[("n2", "n3")]));
        assert!(isolated.is_empty() && majority.is_empty());
        // A five-node ring.
        let five = names(&["n1", "n2", "n3", "n4", "n5"]);
        let ring = cut(&[
            ("n1", "n3"),
            ("n1", "n4"),
            ("n2", "n4"),
            ("n2", "n5"),
            ("n3", "n5"),
        ]);
        assert_eq!(sides(&five, &ring), (vec![], vec![]));
    }

    #[test]
    fn every_partition_cuts_something_and_client_partitions_leave_a_minority() {
        let masters = names(&["n1", "n2", "n3", "n4", "n5"]);
        let replicas = names(&["r1"]);
        let mut rng = StdRng::seed_from_u64(3);
        let mut kinds = BTreeSet::new();
        for _ in 0..200 {
            let plan = plan_partition(&masters, &replicas, Some("n4"), false, false, &mut rng);
            assert!(!plan.cuts.is_empty(), "{plan:?}");
            assert!(plan.unreachable.is_empty());
            if plan.kind == "partition-leader" {
                assert!(plan.cuts.iter().all(|(a, _)| a == "n4"));
                assert_eq!(plan.cuts.len(), 5);
                assert_eq!(sides(&masters, &plan.cuts).0, names(&["n4"]));
            }
            kinds.insert(plan.kind);
        }
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        for _ in 0..50 {
            let plan = plan_partition(&masters, &replicas, None, true, false, &mut rng);
            assert_eq!(plan.kind, "partition-clients");
            let (isolated, majority) = sides(&masters, &plan.cuts);
            assert_eq!(isolated.len(), 2);
            assert_eq!(majority.len(), 3);
            // The clients reach exactly the minority.
            for m in &majority {
                assert!(plan.unreachable.contains(m));
            }
            for m in &isolated {
                assert!(!plan.unreachable.contains(m));
            }
        }
    }
}
