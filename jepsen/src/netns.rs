//! The run's private network: one namespace for the run (the harness and
//! its clients live there) and one per registry process, each joined to a
//! bridge in the run's namespace by a veth pair.
//!
//! ```text
//!   run namespace  corvid-jepsen-PID        br0 192.0.2.1/24
//!                                     ┌──────┼──────┬─────────┐
//!                                    vn1    vn2    vn3       vr1
//!   node namespaces  …-PID-n1 eth0 192.0.2.11  …-n2 .12  …-n3 .13  …-r1 .21
//! ```
//!
//! Addresses come from TEST-NET-1 (192.0.2.0/24, RFC 5737), which is never
//! routed anywhere, and exist only inside the run's own namespaces. Every
//! packet between two nodes leaves one node's namespace and enters the
//! other's with the nodes' own addresses, whatever the registry binds, so
//! DROP rules in a node's namespace cut exactly what they name (Raft, the
//! replica stream, forwarded writes alike).
//!
//! The harness makes and deletes all of it from outside the run namespace
//! ([`RunNetwork`]); deleting the namespaces removes every veth, bridge and
//! rule with them.

use std::process::Command;

use anyhow::Context;

/// Prefix of every namespace a run makes.
pub const PREFIX: &str = "corvid-jepsen";

/// The bridge's address: the harness and its clients, as nodes see them.
pub const CLIENT_IP: &str = "192.0.2.1";

/// At most this many masters and replicas each (their addresses are
/// 192.0.2.11–19 and 192.0.2.21–29).
pub const MAX_PER_KIND: usize = 9;

/// The run namespace's name for run `id`.
pub fn run_namespace(id: &str) -> String {
    format!("{PREFIX}-{id}")
}

/// The namespace of process `name` (`n1`, `r1`…) of the run whose
/// namespace is `run_ns`.
pub fn node_namespace(run_ns: &str, name: &str) -> String {
    format!("{run_ns}-{name}")
}

/// Master `n{i}`'s address.
pub fn master_ip(i: usize) -> String {
    format!("192.0.2.{}", 10 + i)
}

/// Replica `r{j}`'s address.
pub fn replica_ip(j: usize) -> String {
    format!("192.0.2.{}", 20 + j)
}

/// The processes of a run with `masters` masters and `replicas` replicas:
/// `(name, address)`, masters first.
pub fn processes(masters: usize, replicas: usize) -> Vec<(String, String)> {
    (1..=masters)
        .map(|i| (format!("n{i}"), master_ip(i)))
        .chain((1..=replicas).map(|j| (format!("r{j}"), replica_ip(j))))
        .collect()
}

/// Runs `ip` with `args`; its standard error becomes the error.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::cluster::system_tool(
        "ip",
        args,
        "iproute2; making a network namespace needs root",
    )
}

/// Runs `program args` inside namespace `ns` (`ip netns exec`).
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all)
}

/// Every namespace that exists now.
fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list (iproute2)")?;
    // Lines look like `name` or `name (id: 3)`.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// The run namespace and one namespace per process, made by [`RunNetwork::create`]
/// and deleted when dropped.
pub struct RunNetwork {
    /// The run namespace.
    pub run_ns: String,
    /// Every namespace made, node namespaces first (deleted in this order).
    made: Vec<String>,
}

impl RunNetwork {
    /// Deletes whatever a run with the same `id` left behind (a run killed
    /// with SIGKILL cannot clean up), then makes the run namespace with its
    /// bridge and one namespace per process of `processes`, each with `lo`
    /// up and its veth end addressed. On error, what was made is deleted.
    pub fn create(id: &str, processes: &[(String, String)]) -> anyhow::Result<RunNetwork> {
        let run_ns = run_namespace(id);
        remove_stale(&run_ns)?;
        let mut net = RunNetwork {
            run_ns: run_ns.clone(),
            made: Vec::new(),
        };
        ip(&["netns", "add", &run_ns])?;
        net.made.push(run_ns.clone());
        let run = |program: &str, args: &[&str]| exec_in(&run_ns, program, args);
        run("ip", &["link", "set", "lo", "up"])?;
        run("ip", &["link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "br0"],
        )?;
        run("ip", &["link", "set", "br0", "up"])?;
        for (name, addr) in processes {
            let ns = node_namespace(&run_ns, name);
            ip(&["netns", "add", &ns])?;
            net.made.insert(0, ns.clone());
            let host_end = format!("v{name}");
            run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &host_end, "master", "br0", "up"])?;
            exec_in(&ns, "ip", &["link", "set", "lo", "up"])?;
            exec_in(
                &ns,
                "ip",
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            )?;
            exec_in(&ns, "ip", &["link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// Deletes every namespace made (with their veths, the bridge and every
    /// rule in them). Returns the first error; goes on after one.
    pub fn delete(&mut self) -> anyhow::Result<()> {
        let mut first = Ok(());
        for ns in std::mem::take(&mut self.made) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Drop for RunNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("corvid-jepsen: removing the run's namespaces: {e:#}");
        }
    }
}

/// Deletes the namespace `run_ns` and its node namespaces if they exist.
fn remove_stale(run_ns: &str) -> anyhow::Result<()> {
    let node_prefix = format!("{run_ns}-");
    for ns in list_namespaces()? {
        if ns == run_ns || ns.starts_with(&node_prefix) {
            eprintln!("corvid-jepsen: removing stale namespace {ns}");
            ip(&["netns", "del", &ns])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let run = run_namespace("42");
        assert_eq!(run, "corvid-jepsen-42");
        assert_eq!(node_namespace(&run, "n3"), "corvid-jepsen-42-n3");
        assert_eq!(
            processes(3, 1),
            vec![
                ("n1".to_owned(), "192.0.2.11".to_owned()),
                ("n2".to_owned(), "192.0.2.12".to_owned()),
                ("n3".to_owned(), "192.0.2.13".to_owned()),
                ("r1".to_owned(), "192.0.2.21".to_owned()),
            ]
        );
        // The node namespaces of run 4 are not those of run 42.
        assert!(!node_namespace("corvid-jepsen-42", "n1").starts_with("corvid-jepsen-4-"));
    }
}
