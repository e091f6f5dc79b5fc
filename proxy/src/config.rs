//! `corvid-proxy` configuration: a TOML file (`--config`) with embedded
//! defaults for everything, and command-line flags that override it, in the
//! same style as `corvid-registry`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::namespace::Namespace;
use crate::routing::{BackendAddr, ServerAddrs};

/// The whole configuration file. Every section and key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the embedded replica keeps its data.
    pub proxy: ProxySection,
    /// The masters the embedded replica follows.
    pub replica: ReplicaSection,
    /// The IMAP listeners and their limits.
    pub imap: ImapSection,
    /// The LMTP listeners (mail delivery from the MTA).
    pub lmtp: LmtpSection,
    /// The POP3 listeners.
    pub pop3: Pop3Section,
    /// Certificate and key for STARTTLS and implicit TLS.
    pub tls: TlsSection,
    /// How client passwords are checked.
    pub login: LoginSection,
    /// How the proxy logs in to backends.
    pub backend: BackendSection,
    /// Server name (the part of a location before `!`) → `host[:port][/tls]`.
    pub backends: BTreeMap<String, String>,
    /// Where new top-level mailboxes go.
    pub create: CreateSection,
    /// Mailbox naming; must match the backends' `imapd.conf`.
    pub namespace: NamespaceSection,
    /// The Prometheus endpoint.
    pub metrics: MetricsSection,
}

/// `[proxy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    /// Directory of the embedded replica's RocksDB.
    pub data_dir: PathBuf,
    /// Names allowed to see every mailbox and to move mailboxes between
    /// backends (as Cyrus's `admins`). They must be admins on the backends.
    pub admins: Vec<String>,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            data_dir: PathBuf::from("./proxy-data"),
            admins: Vec::new(),
        }
    }
}

/// `[replica]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaSection {
    /// Peer addresses (`raft.peer_listen`) of the registry's master nodes.
    pub masters: Vec<String>,
    /// Milliseconds a lookup that misses, or finds a reserved mailbox, waits
    /// for the replica to catch up with the masters before answering.
    pub lookup_sync_ms: u64,
}

impl Default for ReplicaSection {
    fn default() -> Self {
        ReplicaSection {
            masters: vec!["127.0.0.1:3906".into()],
            lookup_sync_ms: 1_000,
        }
    }
}

/// `[imap]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImapSection {
    /// Plain IMAP with STARTTLS (143 is the standard port; port 0 lets the
    /// OS pick). Empty string: off.
    pub listen: String,
    /// Implicit TLS (993 is the standard port). Empty string: off.
    pub tls_listen: String,
    /// Most concurrent client sessions; more get `* BYE` at once.
    pub max_sessions: usize,
    /// Longest command line in bytes.
    pub max_line_bytes: usize,
    /// Largest literal (e.g. an APPENDed message) in bytes. Literals are
    /// streamed, never held whole.
    pub max_literal_bytes: u64,
    /// Largest command (line and small literals) parsed by the proxy itself.
    pub max_command_bytes: usize,
    /// Seconds before an unauthenticated session is closed.
    pub login_timeout_secs: u64,
    /// Seconds of client silence before a logged-in session is closed (RFC
    /// 3501 asks for at least 30 minutes).
    pub idle_timeout_secs: u64,
    /// Milliseconds to wait before answering a failed login.
    pub failed_login_delay_ms: u64,
    /// Seconds between the NOOPs that stand in for IDLE on a backend
    /// without IDLE (Cyrus's `imapidlepoll`).
    pub idle_poll_secs: u64,
    /// Allow LOGIN and PLAIN without TLS from clients that are not on
    /// loopback.
    pub allow_plaintext: bool,
}

impl Default for ImapSection {
    fn default() -> Self {
        ImapSection {
            listen: "127.0.0.1:143".into(),
            tls_listen: String::new(),
            max_sessions: 20_000,
            max_line_bytes: 64 * 1024,
            max_literal_bytes: 100 * 1024 * 1024,
            max_command_bytes: 256 * 1024,
            login_timeout_secs: 60,
            idle_timeout_secs: 30 * 60,
            failed_login_delay_ms: 2_000,
            idle_poll_secs: 60,
            allow_plaintext: false,
        }
    }
}

/// `[lmtp]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmtpSection {
    /// TCP listener (24 is LMTP's port); empty string: off.
    pub listen: String,
    /// UNIX socket listener (e.g. `/run/corvid/lmtp`, for Postfix's
    /// `lmtp:unix:`); unset: off.
    pub unix_socket: Option<PathBuf>,
    /// Permissions of the UNIX socket, in octal. Connecting needs write
    /// permission, and the MTA's LMTP client runs as its own user (Postfix's
    /// `postfix`): put that user in the proxy's group, or the socket in a
    /// directory only the MTA can reach and widen this. Anyone who can
    /// connect can deliver mail.
    pub unix_socket_mode: String,
    /// Backends' LMTP port when `[lmtp.backends]` names no address.
    pub backend_port: u16,
    /// Server name → `host[:port]` of its lmtpd, where it is not the IMAP
    /// host on `backend_port`.
    pub backends: BTreeMap<String, String>,
    /// Largest message accepted (announced by `SIZE=` and counted in DATA).
    pub max_message_bytes: u64,
    /// A message is spooled in memory up to this size, then to a file.
    pub spool_memory_bytes: usize,
    /// Directory for spool files; unset: the system's temporary directory.
    pub spool_dir: Option<PathBuf>,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// Idle logged-in connections kept per backend lmtpd for the next
    /// delivery; size it to the MTA's concurrent deliveries (Postfix's
    /// `lmtp_destination_concurrency_limit`, 20 by default, or
    /// `default_destination_concurrency_limit`).
    pub backend_pool_size: usize,
    /// Most concurrent LMTP sessions.
    pub max_sessions: usize,
    /// Seconds of silence from the MTA, or a backend, before giving up.
    pub timeout_secs: u64,
    /// Name in the greeting and the LHLO answer.
    pub hostname: String,
    /// Cyrus's `postuser`: `postuser+shared.folder@…` delivers to the shared
    /// folder (`+shared.folder@…` always does).
    pub postuser: String,
}

impl LmtpSection {
    /// `unix_socket_mode` as permission bits.
    pub fn socket_mode(&self) -> anyhow::Result<u32> {
        let text = self.unix_socket_mode.trim();
        match u32::from_str_radix(text, 8) {
            Ok(mode) if mode <= 0o777 && !text.is_empty() => Ok(mode),
            _ => anyhow::bail!(
                "lmtp.unix_socket_mode {:?} is not octal permission bits such as \"0660\"",
                self.unix_socket_mode
            ),
        }
    }
}

impl Default for LmtpSection {
    fn default() -> Self {
        LmtpSection {
            listen: String::new(),
            unix_socket: None,
            unix_socket_mode: "0660".into(),
            backend_port: 24,
            backends: BTreeMap::new(),
            max_message_bytes: 64 * 1024 * 1024,
            spool_memory_bytes: 1024 * 1024,
            spool_dir: None,
            max_recipients: 1_000,
            backend_pool_size: 64,
            max_sessions: 1_000,
            timeout_secs: 300,
            hostname: "corvid-proxy".into(),
            postuser: String::new(),
        }
    }
}

/// `[pop3]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pop3Section {
    /// Plain POP3 with STLS (110 is the standard port); empty string: off.
    pub listen: String,
    /// Implicit TLS (995 is the standard port); empty string: off.
    pub tls_listen: String,
    /// Backends' POP3 port when `[pop3.backends]` names no address.
    pub backend_port: u16,
    /// Server name → `host[:port]` of its pop3d, where it is not the IMAP
    /// host on `backend_port`.
    pub backends: BTreeMap<String, String>,
    /// Most concurrent POP3 sessions.
    pub max_sessions: usize,
    /// Seconds before an unauthenticated session is closed.
    pub login_timeout_secs: u64,
    /// Seconds of client silence before a session is closed (RFC 1939: at
    /// least 10 minutes).
    pub idle_timeout_secs: u64,
}

impl Default for Pop3Section {
    fn default() -> Self {
        Pop3Section {
            listen: String::new(),
            tls_listen: String::new(),
            backend_port: 110,
            backends: BTreeMap::new(),
            max_sessions: 10_000,
            login_timeout_secs: 60,
            idle_timeout_secs: 600,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

/// How a client's password is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoginCheck {
    /// Log in to the backend of the user's INBOX with the user's own
    /// credentials.
    #[default]
    Backend,
    /// Ask Cyrus SASL's `saslauthd` over its UNIX socket.
    Saslauthd,
}

/// `[login]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginSection {
    /// `backend` or `saslauthd`.
    pub check: LoginCheck,
    /// `saslauthd`'s socket (Debian: `/run/saslauthd/mux`).
    pub saslauthd_socket: PathBuf,
    /// Service name given to `saslauthd`.
    pub saslauthd_service: String,
    /// Seconds a successful check is remembered (a salted hash in memory),
    /// so that frequent reconnects do not each cost a check; 0: off. A
    /// changed password takes effect for a user after at most this long.
    pub cache_secs: u64,
}

impl Default for LoginSection {
    fn default() -> Self {
        LoginSection {
            check: LoginCheck::Backend,
            saslauthd_socket: PathBuf::from("/run/saslauthd/mux"),
            saslauthd_service: "imap".into(),
            cache_secs: 60,
        }
    }
}

/// `[backend]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSection {
    /// The proxy's authentication id on backends (Cyrus's
    /// `proxy_authname`); backends list it in `proxyservers`.
    pub authname: String,
    /// Its password (prefer `password_file`).
    pub password: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Seconds to wait for a backend's TCP connect, TLS and login.
    pub connect_timeout_secs: u64,
    /// Seconds a backend may take to answer a command before the session is
    /// ended.
    pub command_timeout_secs: u64,
    /// A cached backend connection idle this long is checked with NOOP
    /// before reuse.
    pub noop_after_idle_secs: u64,
    /// CA certificates (PEM) for backends reached with `/tls`; empty: the
    /// system's roots are not loaded, so set this when using `/tls`.
    pub tls_ca: Option<PathBuf>,
}

impl Default for BackendSection {
    fn default() -> Self {
        BackendSection {
            authname: "proxy".into(),
            password: None,
            password_file: None,
            connect_timeout_secs: 10,
            command_timeout_secs: 300,
            noop_after_idle_secs: 60,
            tls_ca: None,
        }
    }
}

/// How CREATE picks a backend for a new top-level mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectMode {
    /// Any server of the list, at random.
    #[default]
    Random,
    /// The server with the most free space, from each backend's
    /// `/shared/vendor/cmu/cyrus-imapd/freespace/total` metadata.
    FreespaceMost,
}

/// `[create]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateSection {
    /// Servers (names from `[backends]`) new top-level mailboxes may go to
    /// (Cyrus's `serverlist`).
    pub servers: Vec<String>,
    /// `random` or `freespace-most`.
    pub select_mode: SelectMode,
}

/// `[namespace]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceSection {
    /// `/` as the hierarchy separator (Cyrus `unixhierarchysep`).
    pub unixhierarchysep: bool,
    /// Personal folders at the top level (Cyrus `altnamespace`).
    pub altnamespace: bool,
    /// `user@domain` logins (Cyrus `virtdomains`).
    pub virtdomains: bool,
    /// Domain of users who log in without one (Cyrus `defaultdomain`).
    pub defaultdomain: Option<String>,
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus endpoint; empty string: off.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: "127.0.0.1:9143".into(),
        }
    }
}

/// Command-line flags; each overrides the key named in brackets.
#[derive(Debug, Parser)]
#[command(
    name = "corvid-proxy",
    version,
    about = "IMAP frontend for a Cyrus Murder that looks mailboxes up in an embedded Corvid replica",
    long_about = "IMAP frontend for a Cyrus IMAP Murder.\n\n\
        It follows the Corvid registry's masters into a local replica, answers \
        the namespace from it and relays each mailbox's traffic to the Cyrus \
        backend that holds it. With no arguments it follows 127.0.0.1:3906 and \
        listens for IMAP on 127.0.0.1:143."
)]
pub struct Args {
    /// TOML configuration file (see `--print-config` for every key).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Master peer addresses, comma-separated [replica.masters].
    #[arg(long, value_delimiter = ',')]
    pub masters: Vec<String>,
    /// Replica data directory [proxy.data_dir].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// IMAP listen address [imap.listen].
    #[arg(long)]
    pub imap_listen: Option<String>,
    /// Implicit-TLS IMAP listen address [imap.tls_listen].
    #[arg(long)]
    pub imaps_listen: Option<String>,
    /// Metrics listen address [metrics.listen].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// A backend, `NAME=host[:port][/tls]`, repeatable [backends].
    #[arg(long = "backend", value_name = "NAME=ADDR")]
    pub backends: Vec<String>,
}

impl Config {
    /// Reads the file named by `args` (if any), applies the flags and
    /// validates.
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
        if !args.masters.is_empty() {
            config.replica.masters = args.masters.clone();
        }
        if let Some(v) = &args.data_dir {
            config.proxy.data_dir = v.clone();
        }
        if let Some(v) = &args.imap_listen {
            config.imap.listen = v.clone();
        }
        if let Some(v) = &args.imaps_listen {
            config.imap.tls_listen = v.clone();
        }
        if let Some(v) = &args.metrics_listen {
            config.metrics.listen = v.clone();
        }
        for b in &args.backends {
            let (name, addr) = b.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("--backend {b:?}: expected NAME=host[:port][/tls]")
            })?;
            config.backends.insert(name.into(), addr.into());
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration file's text (no flags applied, not validated).
    /// An empty path (`cert = ""`) means the same as a missing key.
    pub fn from_toml_str(text: &str) -> Result<Config, toml::de::Error> {
        let mut config: Config = toml::from_str(text)?;
        for path in [
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.backend.tls_ca,
            &mut config.backend.password_file,
            &mut config.lmtp.unix_socket,
            &mut config.lmtp.spool_dir,
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        Ok(config)
    }

    /// Checks the settings for contradictions and unusable values.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.lmtp.socket_mode()?;
        anyhow::ensure!(
            !self.replica.masters.is_empty(),
            "replica.masters is empty: the proxy needs the registry's master peer addresses"
        );
        anyhow::ensure!(
            !self.imap.listen.is_empty()
                || !self.imap.tls_listen.is_empty()
                || !self.lmtp.listen.is_empty()
                || self.lmtp.unix_socket.is_some()
                || !self.pop3.listen.is_empty()
                || !self.pop3.tls_listen.is_empty(),
            "every listener (imap, lmtp, pop3) is off: nothing to serve"
        );
        anyhow::ensure!(
            self.pop3.tls_listen.is_empty() || self.tls.cert.is_some(),
            "pop3.tls_listen needs tls.cert and tls.key"
        );
        for (section, map) in [
            ("lmtp.backends", &self.lmtp.backends),
            ("pop3.backends", &self.pop3.backends),
        ] {
            for (name, addr) in map {
                anyhow::ensure!(
                    self.backends.contains_key(name),
                    "{section}.{name}: no such server in [backends]"
                );
                BackendAddr::parse(addr)
                    .map_err(|e| anyhow::anyhow!("{section}.{name} = {addr:?}: {e}"))?;
            }
        }
        for (key, value) in [
            ("lmtp.listen", &self.lmtp.listen),
            ("pop3.listen", &self.pop3.listen),
            ("pop3.tls_listen", &self.pop3.tls_listen),
            ("imap.listen", &self.imap.listen),
            ("imap.tls_listen", &self.imap.tls_listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if !value.is_empty() {
                value
                    .parse::<SocketAddr>()
                    .map_err(|e| anyhow::anyhow!("{key} = {value:?}: {e}"))?;
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => anyhow::bail!("tls.cert is set but tls.key is not"),
            (None, Some(_)) => anyhow::bail!("tls.key is set but tls.cert is not"),
            _ => {}
        }
        anyhow::ensure!(
            self.imap.tls_listen.is_empty() || self.tls.cert.is_some(),
            "imap.tls_listen needs tls.cert and tls.key"
        );
        anyhow::ensure!(
            self.imap.max_line_bytes >= 1024,
            "imap.max_line_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.imap.max_command_bytes >= self.imap.max_line_bytes,
            "imap.max_command_bytes must be at least imap.max_line_bytes"
        );
        anyhow::ensure!(
            self.imap.max_sessions > 0,
            "imap.max_sessions must be positive"
        );
        for (name, addr) in &self.backends {
            BackendAddr::parse(addr)
                .map_err(|e| anyhow::anyhow!("backends.{name} = {addr:?}: {e}"))?;
        }
        for s in &self.create.servers {
            anyhow::ensure!(
                self.backends.contains_key(s),
                "create.servers names {s:?}, which is not in [backends]"
            );
        }
        if self.backend.password.is_some() && self.backend.password_file.is_some() {
            anyhow::bail!("set backend.password or backend.password_file, not both");
        }
        Ok(())
    }

    /// The proxy's own password on backends.
    pub fn backend_password(&self) -> anyhow::Result<String> {
        if let Some(p) = &self.backend.password {
            return Ok(p.clone());
        }
        if let Some(path) = &self.backend.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading backend.password_file {}: {e}", path.display())
            })?;
            return Ok(text.lines().next().unwrap_or("").to_string());
        }
        anyhow::bail!(
            "the proxy needs its backend password: set backend.password or backend.password_file"
        )
    }

    /// Every backend's addresses: IMAP from `[backends]`, LMTP and POP3
    /// from `[lmtp.backends]`/`[pop3.backends]` or else the IMAP host on
    /// the service's `backend_port`.
    pub fn server_addrs(&self) -> anyhow::Result<BTreeMap<String, ServerAddrs>> {
        let mut out = BTreeMap::new();
        for (name, imap) in &self.backends {
            let imap = BackendAddr::parse(imap)?;
            let service =
                |map: &BTreeMap<String, String>, port: u16| -> anyhow::Result<BackendAddr> {
                    Ok(match map.get(name) {
                        Some(a) => BackendAddr::parse(a)?,
                        None => BackendAddr {
                            host: imap.host.clone(),
                            port,
                            tls: imap.tls,
                        },
                    })
                };
            let lmtp = service(&self.lmtp.backends, self.lmtp.backend_port)?;
            let pop3 = service(&self.pop3.backends, self.pop3.backend_port)?;
            out.insert(name.clone(), ServerAddrs { imap, lmtp, pop3 });
        }
        Ok(out)
    }

    /// The namespace settings as the naming module takes them.
    pub fn namespace(&self) -> Namespace {
        Namespace {
            unixhierarchysep: self.namespace.unixhierarchysep,
            altnamespace: self.namespace.altnamespace,
            virtdomains: self.namespace.virtdomains,
            defaultdomain: self.namespace.defaultdomain.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_refused() {
        Config::default().validate().unwrap();
        assert!(Config::from_toml_str("[imap]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n").is_err());
        assert!(Config::from_toml_str("[nope]\n").is_err());
        let c = Config::from_toml_str("[tls]\ncert = \"\"\nkey = \"\"\n").unwrap();
        assert!(c.tls.cert.is_none() && c.tls.key.is_none());
    }

    #[test]
    fn contradictions_are_named() {
        let c = Config::from_toml_str("[tls]\ncert = \"/c\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("tls.key"));
        let c = Config::from_toml_str("[create]\nservers = [\"be9\"]\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("be9"));
        let c = Config::from_toml_str("[backends]\nbe1 = \"host:notaport\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backends.be1"));
        for bad in ["0999", "rw", "", "01777"] {
            let c =
                Config::from_toml_str(&format!("[lmtp]\nunix_socket_mode = \"{bad}\"\n")).unwrap();
            assert!(c
                .validate()
                .unwrap_err()
                .to_string()
                .contains("unix_socket_mode"));
        }
        let c = Config::from_toml_str("[lmtp]\nunix_socket_mode = \"0666\"\n").unwrap();
        assert_eq!(c.lmtp.socket_mode().unwrap(), 0o666);
    }
}
