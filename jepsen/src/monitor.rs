//! The metrics monitor: scrapes every master's Prometheus endpoint every
//! [`INTERVAL`] during the run and keeps what the nodes say about Raft
//! (term, leader, leader changes, heartbeat ages), or that they did not
//! answer. [`crate::evidence`] reads these samples to show that each fault
//! did what it should.
//!
//! The harness reaches the metrics port of every node whatever the nemesis
//! does: partitions cut nodes from each other and, at most, the clients'
//! MUPDATE port.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time between two scrapes of a node.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A scrape that takes longer than this counts as no answer (a paused
/// node accepts the connection but never answers).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// What one node said at one time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Nanoseconds since the run started, when the scrape began.
    pub time_ns: u64,
    /// The master's name (`n1`…).
    pub node: String,
    /// Whether it answered.
    pub up: bool,
    /// `corvid_raft_term`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// `corvid_raft_leader_id` (0: none known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<u64>,
    /// `corvid_server_is_leader`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_leader: Option<bool>,
    /// `corvid_server_leader_changes_seen_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_changes: Option<u64>,
    /// `corvid_raft_peer_heartbeat_age_seconds` by peer id (exported by the
    /// leader only, refreshed when its Raft metrics change).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub heartbeat_age_s: BTreeMap<u64, f64>,
}

impl Sample {
    /// Reads the metrics this module keeps out of a Prometheus text page.
    pub fn parse(time_ns: u64, node: &str, page: &str) -> Sample {
        let mut s = Sample {
            time_ns,
            node: node.to_owned(),
            up: true,
            ..Sample::default()
        };
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            match name {
                "corvid_raft_term" => s.term = Some(value as u64),
                "corvid_raft_leader_id" => s.leader_id = Some(value as u64),
                "corvid_server_is_leader" => s.is_leader = Some(value >= 1.0),
                "corvid_server_leader_changes_seen_total" => s.leader_changes = Some(value as u64),
                "corvid_raft_peer_heartbeat_age_seconds" => {
                    let peer = labels
                        .split(',')
                        .find_map(|l| l.trim().strip_prefix("peer=\""))
                        .and_then(|p| p.trim_end_matches(['"', '}']).parse().ok());
                    if let Some(peer) = peer {
                        s.heartbeat_age_s.insert(peer, value);
                    }
                }
                _ => {}
            }
        }
        s
    }
}

/// The monitor running in the background.
pub struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Starts scraping `targets` (`(name, metrics address)`) until
    /// [`Monitor::finish`] or `until`, whichever comes first; times are
    /// since `started`.
    pub fn spawn(targets: Vec<(String, String)>, started: Instant, until: Instant) -> Monitor {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < until && !*stopped.borrow() {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let time_ns = started.elapsed().as_nanos() as u64;
                // All nodes at once: a paused node must not delay the
                // others' samples.
                let scrapes: Vec<_> = targets
                    .iter()
                    .cloned()
                    .map(|(name, addr)| {
                        tokio::spawn(async move {
                            match scrape(&addr).await {
                                Some(page) => Sample::parse(time_ns, &name, &page),
                                None => Sample {
                                    time_ns,
                                    node: name,
                                    ..Sample::default()
                                },
                            }
                        })
                    })
                    .collect();
                for s in scrapes {
                    if let (Ok(sample), Ok(mut v)) = (s.await, sink.lock()) {
                        v.push(sample);
                    }
                }
            }
        });
        Monitor {
            samples,
            stop,
            task,
        }
    }

    /// Stops scraping; returns every sample, in time order.
    pub async fn finish(self) -> Vec<Sample> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let mut v = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by_key(|s| s.time_ns);
        v
    }
}

/// The value of the unlabelled series `name` in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One `GET /metrics`, or `None` if the node did not answer in time.
pub async fn scrape(addr: &str) -> Option<String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, get)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_series() {
        let page = "# TYPE corvid_stream_followers gauge\ncorvid_stream_followers_x 3\ncorvid_stream_followers 1\n";
        assert_eq!(metric(page, "corvid_stream_followers"), Some(1.0));
        assert_eq!(metric(page, "corvid_raft_term"), None);
    }

    #[test]
    fn parses_the_raft_metrics() {
        let page = "# HELP corvid_raft_term Current Raft term\n\
                    # TYPE corvid_raft_term gauge\n\
                    corvid_raft_term 7\n\
                    corvid_raft_leader_id 2\n\
                    corvid_server_is_leader 1\n\
                    corvid_server_leader_changes_seen_total 3\n\
                    corvid_raft_peer_heartbeat_age_seconds{peer=\"1\"} 0.05\n\
                    corvid_raft_peer_heartbeat_age_seconds{peer=\"3\"} 2.5\n\
                    corvid_raft_applied_index 100\n";
        let s = Sample::parse(5, "n2", page);
        assert!(s.up);
        assert_eq!(s.term, Some(7));
        assert_eq!(s.leader_id, Some(2));
        assert_eq!(s.is_leader, Some(true));
        assert_eq!(s.leader_changes, Some(3));
        assert_eq!(s.heartbeat_age_s, BTreeMap::from([(1, 0.05), (3, 2.5)]));
    }
}
