//! `corvid-registry` configuration: a TOML file (`--config`) with embedded
//! defaults for everything, and command-line flags that override it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::raft::RaftSettings;

/// The whole configuration file. Every section and key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where data lives and what this node is called.
    pub node: NodeConfig,
    /// The MUPDATE listener.
    pub mupdate: MupdateConfig,
    /// STARTTLS certificate and key.
    pub tls: TlsConfig,
    /// Credentials.
    pub auth: AuthConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Raft timing and log retention (masters; replicas use only the
    /// `peer_tls_*` keys, to reach the masters' peer ports).
    pub raft: RaftSettings,
    /// What a replica follows (`node.role = "replica"`).
    pub replica: ReplicaConfig,
}

/// What a node is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A Raft member: votes, holds the log, serves the log stream.
    #[default]
    Master,
    /// Follows the masters' log stream; serves reads from its copy and
    /// forwards writes.
    Replica,
}

/// `[replica]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Peer addresses (`host:port` of `raft.peer_listen`) of the master
    /// nodes, tried in turn.
    pub masters: Vec<String>,
    /// Give up a log stream silent for this many milliseconds.
    pub silence_timeout_ms: u64,
    /// Leave a master that has known no leader for this many milliseconds.
    pub leaderless_timeout_ms: u64,
    /// A write forwarded to the masters fails after this many milliseconds.
    pub write_timeout_ms: u64,
    /// `/readyz` answers 503 while the replica is more than this many log
    /// entries behind its master.
    pub ready_max_lag_entries: u64,
    /// `/readyz` answers 503 while the replica has been behind its master
    /// for longer than this many seconds (0: no time limit).
    pub ready_max_lag_secs: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            masters: Vec::new(),
            silence_timeout_ms: 5_000,
            leaderless_timeout_ms: 3_000,
            write_timeout_ms: 5_000,
            ready_max_lag_entries: 1_000,
            ready_max_lag_secs: 30,
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Directory for the RocksDB database, snapshots and credentials.
    pub data_dir: PathBuf,
    /// Name sent in the MUPDATE greeting.
    pub server_name: String,
    /// `master` (a Raft member) or `replica`.
    pub role: Role,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./data"),
            server_name: "corvid".into(),
            role: Role::Master,
        }
    }
}

/// `[mupdate]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MupdateConfig {
    /// Address to listen on (3905 is MUPDATE's standard port).
    pub listen: SocketAddr,
    /// Most concurrent connections; more are answered `* BYE`.
    pub max_connections: usize,
    /// Seconds of silence after which an authenticated connection is
    /// closed.
    pub idle_timeout_secs: u64,
    /// Seconds a connection may stay unauthenticated (from its greeting to a
    /// successful AUTHENTICATE) before it is closed.
    pub login_timeout_secs: u64,
    /// Most concurrent connections that have not authenticated yet; more
    /// are answered `* BYE` at once. Authenticated sessions do not count.
    pub max_unauthenticated: usize,
    /// Most password checks (PBKDF2) running at once, on threads apart from
    /// the ones that run Raft; 0 means one per CPU core.
    pub max_parallel_auth: usize,
    /// Milliseconds to wait before answering a failed authentication.
    pub failed_auth_delay_ms: u64,
    /// Allow PLAIN on connections that are neither TLS nor loopback.
    pub allow_plaintext: bool,
    /// Longest command line in bytes.
    pub max_line_bytes: usize,
    /// Largest literal in bytes.
    pub max_literal_bytes: usize,
}

impl Default for MupdateConfig {
    fn default() -> Self {
        MupdateConfig {
            listen: "127.0.0.1:3905".parse().expect("valid default address"),
            max_connections: 4096,
            idle_timeout_secs: 30 * 60,
            login_timeout_secs: 30,
            max_unauthenticated: 256,
            max_parallel_auth: 0,
            failed_auth_delay_ms: 1000,
            allow_plaintext: false,
            max_line_bytes: 8192,
            max_literal_bytes: 64 * 1024,
        }
    }
}

/// `[tls]`: both or neither.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

/// `[auth]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The credentials file; default `<data_dir>/users.toml`.
    pub users_file: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` HTTP endpoint.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9905".parse().expect("valid default address"),
        }
    }
}

/// Command line of `corvid-registry`. Flags override the config file.
#[derive(Debug, Parser)]
#[command(
    name = "corvid-registry",
    version,
    about = "Raft-backed MUPDATE master for a Cyrus IMAP Murder",
    long_about = "Raft-backed MUPDATE master for a Cyrus IMAP Murder.\n\n\
        With no arguments it runs a one-node registry with embedded defaults: \
        MUPDATE on 127.0.0.1:3905, metrics on http://127.0.0.1:9905/metrics, \
        data under ./data. On first start it creates an administrator \
        credential and prints where it is."
)]
pub struct Args {
    /// TOML configuration file (see `--print-config` for every key).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// master or replica [node.role].
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// Master peer addresses a replica follows, comma-separated
    /// [replica.masters].
    #[arg(long, value_delimiter = ',')]
    pub masters: Vec<String>,
    /// Data directory [node.data_dir].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Name sent in the greeting [node.server_name].
    #[arg(long)]
    pub server_name: Option<String>,
    /// MUPDATE listen address; port 0 picks a free port [mupdate.listen].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address; port 0 picks a free port [metrics.listen].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Credentials file [auth.users_file].
    #[arg(long)]
    pub users_file: Option<PathBuf>,
    /// PEM certificate for STARTTLS [tls.cert].
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS [tls.key].
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow PLAIN without TLS from non-loopback peers [mupdate.allow_plaintext].
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Raft node id [raft.node_id].
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Peer protocol listen address; port 0 picks a free port [raft.peer_listen].
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// Address other nodes use to reach this one [raft.peer_advertise].
    #[arg(long)]
    pub peer_advertise: Option<String>,
    /// Do not make a one-node cluster on first start (for nodes that join a
    /// cluster) [raft.bootstrap = false].
    #[arg(long)]
    pub no_bootstrap: bool,
    /// TEST ONLY, BREAKS SAFETY: serve reads from local state with no read
    /// index, even without a leader (for the Jepsen harness's self-check)
    /// [raft.unsafe_test_stale_reads].
    #[arg(long)]
    pub unsafe_test_stale_reads: bool,
    /// TEST ONLY, BREAKS SAFETY: the leader serves reads from its own state
    /// without confirming its leadership; followers stay linearizable
    /// [raft.unsafe_test_leader_local_reads].
    #[arg(long)]
    pub unsafe_test_leader_local_reads: bool,
    /// TEST ONLY, BREAKS DURABILITY: acknowledge log appends without
    /// fsyncing the WAL; a power loss loses acknowledged writes
    /// [raft.unsafe_test_ack_before_fsync].
    #[arg(long)]
    pub unsafe_test_ack_before_fsync: bool,
    /// TEST ONLY: pause this many milliseconds before each snapshot chunk
    /// sent down a log stream, so tests can stop a master mid-transfer
    /// [raft.unsafe_test_stream_frame_delay_ms].
    #[arg(long)]
    pub unsafe_test_stream_frame_delay_ms: Option<u64>,
    /// Let a master listen for peers on a non-loopback address without peer
    /// mutual TLS [raft.allow_insecure_peer].
    #[arg(long)]
    pub allow_insecure_peer: bool,
    /// The leader answers linearizable reads from its lease, without a
    /// quorum round, assuming bounded clock drift [raft.lease_reads].
    #[arg(long)]
    pub lease_reads: bool,
    /// linearizable or local [raft.read_consistency].
    #[arg(long, value_parser = parse_read_consistency)]
    pub read_consistency: Option<crate::raft::ReadConsistency>,
}

fn parse_read_consistency(s: &str) -> Result<crate::raft::ReadConsistency, String> {
    match s {
        "linearizable" => Ok(crate::raft::ReadConsistency::Linearizable),
        "local" => Ok(crate::raft::ReadConsistency::Local),
        other => Err(format!("{other:?}: expected linearizable or local")),
    }
}

impl Config {
    /// Reads the file named by `args` (if any) and applies the flags.
    pub fn load(args: &Args) -> anyhow::Result<Config> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
                Config::from_toml_str(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = &args.data_dir {
            config.node.data_dir = v.clone();
        }
        if let Some(v) = args.role {
            config.node.role = v;
        }
        if !args.masters.is_empty() {
            config.replica.masters = args.masters.clone();
        }
        if let Some(v) = &args.server_name {
            config.node.server_name = v.clone();
        }
        if let Some(v) = args.listen {
            config.mupdate.listen = v;
        }
        if let Some(v) = args.metrics_listen {
            config.metrics.listen = v;
        }
        if let Some(v) = &args.users_file {
            config.auth.users_file = Some(v.clone());
        }
        if let Some(v) = &args.tls_cert {
            config.tls.cert = Some(v.clone());
        }
        if let Some(v) = &args.tls_key {
            config.tls.key = Some(v.clone());
        }
        if args.allow_plaintext {
            config.mupdate.allow_plaintext = true;
        }
        if let Some(v) = args.node_id {
            config.raft.node_id = v;
        }
        if let Some(v) = args.peer_listen {
            config.raft.peer_listen = v;
        }
        if let Some(v) = &args.peer_advertise {
            config.raft.peer_advertise = Some(v.clone());
        }
        if args.no_bootstrap {
            config.raft.bootstrap = false;
        }
        if args.unsafe_test_stale_reads {
            config.raft.unsafe_test_stale_reads = true;
        }
        if args.unsafe_test_leader_local_reads {
            config.raft.unsafe_test_leader_local_reads = true;
        }
        if args.unsafe_test_ack_before_fsync {
            config.raft.unsafe_test_ack_before_fsync = true;
        }
        if let Some(v) = args.unsafe_test_stream_frame_delay_ms {
            config.raft.unsafe_test_stream_frame_delay_ms = v;
        }
        if args.allow_insecure_peer {
            config.raft.allow_insecure_peer = true;
        }
        if args.lease_reads {
            config.raft.lease_reads = true;
        }
        if let Some(v) = args.read_consistency {
            config.raft.read_consistency = v;
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration file's text (no flags applied, not validated:
    /// [`Config::load`] validates after the flags). Pure, for the fuzzer.
    pub fn from_toml_str(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the settings for contradictions and unusable values.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tls.cert.is_some() == self.tls.key.is_some(),
            "[tls] needs both cert and key (only {} is set): refusing to run MUPDATE without the TLS \
             that was asked for",
            if self.tls.cert.is_some() { "cert" } else { "key" }
        );
        let r = &self.raft;
        let peer_tls_keys = [&r.peer_tls_cert, &r.peer_tls_key, &r.peer_tls_ca];
        let set = peer_tls_keys.iter().filter(|k| k.is_some()).count();
        anyhow::ensure!(
            set == 0 || set == 3,
            "[raft] peer_tls_cert, peer_tls_key and peer_tls_ca go together ({set} of 3 set): \
             refusing to run the peer port without the TLS that was asked for"
        );
        anyhow::ensure!(
            self.node.role != Role::Master
                || set == 3
                || r.peer_listen.ip().is_loopback()
                || r.allow_insecure_peer,
            "raft.peer_listen = {} is not a loopback address and peer mutual TLS is off: anyone \
             who reaches that port could act as a cluster member. Set raft.peer_tls_cert, \
             peer_tls_key and peer_tls_ca, or set raft.allow_insecure_peer = true \
             (--allow-insecure-peer) on a network only the registry nodes reach",
            r.peer_listen
        );
        anyhow::ensure!(
            r.max_peer_connections > 0,
            "raft.max_peer_connections must be positive"
        );
        anyhow::ensure!(
            self.mupdate.login_timeout_secs > 0 && self.mupdate.idle_timeout_secs > 0,
            "mupdate.login_timeout_secs and idle_timeout_secs must be positive"
        );
        anyhow::ensure!(
            self.mupdate.max_unauthenticated > 0,
            "mupdate.max_unauthenticated must be positive"
        );
        anyhow::ensure!(
            self.mupdate.max_line_bytes >= 1024,
            "mupdate.max_line_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.mupdate.max_literal_bytes >= 1024,
            "mupdate.max_literal_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.mupdate.max_connections > 0,
            "mupdate.max_connections must be positive"
        );
        anyhow::ensure!(self.raft.node_id > 0, "raft.node_id must be positive");
        anyhow::ensure!(
            self.node.role == Role::Master || !self.replica.masters.is_empty(),
            "a replica needs the peer addresses of its masters: [replica] masters or --masters"
        );
        anyhow::ensure!(
            self.raft.election_timeout_min_ms > self.raft.heartbeat_ms
                && self.raft.election_timeout_max_ms > self.raft.election_timeout_min_ms,
            "raft: need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
        );
        Ok(())
    }

    /// Whether a master's peer port is open to the network without mutual
    /// TLS, as `raft.allow_insecure_peer` permits (log a warning).
    pub fn peer_port_insecure(&self) -> bool {
        self.node.role == Role::Master
            && self.raft.peer_tls_cert.is_none()
            && !self.raft.peer_listen.ip().is_loopback()
    }

    /// The credentials file in effect.
    pub fn users_file(&self) -> PathBuf {
        self.auth
            .users_file
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("users.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.mupdate.listen, Config::default().mupdate.listen);
        assert_eq!(back.raft.heartbeat_ms, 50);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            toml::from_str::<Config>("[mupdate]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[mupdate]\nlisten = \"127.0.0.1:1111\"\n[node]\nserver_name = \"file\"\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "corvid-registry",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:2222",
        ]);
        let c = Config::load(&args).unwrap();
        assert_eq!(c.mupdate.listen.port(), 2222);
        assert_eq!(c.node.server_name, "file");
    }

    #[test]
    fn a_replica_needs_masters() {
        let args = Args::parse_from(["corvid-registry", "--role", "replica"]);
        let err = Config::load(&args).unwrap_err();
        assert!(err.to_string().contains("masters"), "{err}");
        let args = Args::parse_from([
            "corvid-registry",
            "--role",
            "replica",
            "--masters",
            "127.0.0.1:1,127.0.0.1:2",
        ]);
        let c = Config::load(&args).unwrap();
        assert_eq!(c.replica.masters.len(), 2);
        assert_eq!(c.node.role, Role::Replica);
    }

    #[test]
    fn half_a_tls_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[tls]\ncert = \"/x.pem\"\n").unwrap();
        let args = Args::parse_from(["corvid-registry", "--config", path.to_str().unwrap()]);
        assert!(Config::load(&args).is_err());
    }

    fn load_toml(text: &str, flags: &[&str]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec!["corvid-registry", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(flags);
        Config::load(&Args::parse_from(argv))
    }

    #[test]
    fn half_configured_tls_names_what_is_missing() {
        for (text, want) in [
            ("[tls]\nkey = \"/k.pem\"\n", "only key"),
            ("[tls]\ncert = \"/c.pem\"\n", "only cert"),
            ("[raft]\npeer_tls_cert = \"/c.pem\"\n", "1 of 3"),
            (
                "[raft]\npeer_tls_cert = \"/c.pem\"\npeer_tls_key = \"/k.pem\"\n",
                "2 of 3",
            ),
            // A replica uses the peer TLS keys as a client: same rule.
            (
                "[node]\nrole = \"replica\"\n[replica]\nmasters = [\"127.0.0.1:1\"]\n\
                 [raft]\npeer_tls_key = \"/k.pem\"\n",
                "1 of 3",
            ),
        ] {
            let err = load_toml(text, &[]).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn open_peer_port_needs_tls_or_explicit_consent() {
        let open = "[raft]\npeer_listen = \"192.0.2.1:3906\"\n";
        let err = load_toml(open, &[]).unwrap_err().to_string();
        assert!(err.contains("allow_insecure_peer"), "{err}");
        let c = load_toml(open, &["--allow-insecure-peer"]).unwrap();
        assert!(c.raft.allow_insecure_peer && c.peer_port_insecure());
        let c = load_toml(&format!("{open}allow_insecure_peer = true\n"), &[]).unwrap();
        assert!(c.peer_port_insecure());
        // The wildcard address is not loopback either.
        assert!(load_toml("[raft]\npeer_listen = \"0.0.0.0:3906\"\n", &[]).is_err());
        // Loopback (all of 127/8, and ::1) is fine as it is.
        for a in ["127.0.0.11:3906", "[::1]:3906"] {
            let c = load_toml(&format!("[raft]\npeer_listen = \"{a}\"\n"), &[]).unwrap();
            assert!(!c.peer_port_insecure());
        }
        // With peer TLS set, any address is fine.
        let tls = "[raft]\npeer_listen = \"192.0.2.1:3906\"\npeer_tls_cert = \"/c\"\n\
                   peer_tls_key = \"/k\"\npeer_tls_ca = \"/a\"\n";
        assert!(!load_toml(tls, &[]).unwrap().peer_port_insecure());
        // Replicas do not listen on a peer port.
        let replica = "[node]\nrole = \"replica\"\n[replica]\nmasters = [\"192.0.2.1:1\"]\n\
                       [raft]\npeer_listen = \"192.0.2.9:3906\"\n";
        assert!(load_toml(replica, &[]).is_ok());
    }

    #[test]
    fn new_mupdate_limits_have_defaults_and_are_checked() {
        let c = Config::default();
        assert_eq!(c.mupdate.login_timeout_secs, 30);
        assert!(c.mupdate.max_unauthenticated > 0);
        assert!(load_toml("[mupdate]\nmax_unauthenticated = 0\n", &[]).is_err());
        assert!(load_toml("[mupdate]\nlogin_timeout_secs = 0\n", &[]).is_err());
        assert!(load_toml("[raft]\nmax_peer_connections = 0\n", &[]).is_err());
    }
}
