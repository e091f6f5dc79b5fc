//! Connecting to a MUPDATE server from the command line, and the shell.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use corvid_registry::mupdate::client::Client;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// How to reach and log in to a MUPDATE server.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server address host:port.
    #[arg(long, short = 's', default_value = "127.0.0.1:3905")]
    pub server: String,
    /// User to authenticate as (default: the credential file's user).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Password (prefer --credential-file; arguments are visible in `ps`).
    #[arg(long, short = 'w')]
    pub password: Option<String>,
    /// TOML file with `user` and `password`, as written by corvid-registry
    /// on first start.
    #[arg(long, default_value = "./data/admin-credential.txt")]
    pub credential_file: PathBuf,
    /// SASL mechanism: PLAIN or SCRAM-SHA-256.
    #[arg(long, short = 'm', default_value = "PLAIN")]
    pub mechanism: String,
    /// Do not authenticate.
    #[arg(long)]
    pub no_auth: bool,
    /// Issue STARTTLS before authenticating.
    #[arg(long)]
    pub starttls: bool,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long, requires = "starttls")]
    pub ca: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the host of --server).
    #[arg(long)]
    pub tls_name: Option<String>,
}

/// A credential file: `user` and `password`, as `admin-credential.txt`.
#[derive(serde::Deserialize)]
pub struct CredentialFile {
    /// User name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl CredentialFile {
    /// Reads and parses `path`.
    pub fn read(path: &std::path::Path) -> anyhow::Result<CredentialFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the credential file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

impl ConnectArgs {
    /// The user and password to log in with.
    pub fn credentials(&self) -> anyhow::Result<(String, String)> {
        let file = || CredentialFile::read(&self.credential_file);
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => Ok((u.clone(), p.clone())),
            (None, Some(p)) => Ok(("admin".into(), p.clone())),
            (Some(u), None) => Ok((u.clone(), file()?.password)),
            (None, None) => {
                let f = file()?;
                Ok((f.user, f.password))
            }
        }
    }

    fn tls_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let Some(ca) = &self.ca else {
            bail!("--starttls needs --ca FILE (the CA that signed the server's certificate)");
        };
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Connects, optionally upgrades to TLS, and authenticates.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut c = Client::connect(&self.server)
            .await
            .with_context(|| format!("connecting to {}", self.server))?;
        if self.starttls {
            let name = match &self.tls_name {
                Some(n) => n.clone(),
                None => self
                    .server
                    .rsplit_once(':')
                    .map_or(self.server.as_str(), |(h, _)| h)
                    .to_owned(),
            };
            c.starttls(self.tls_config()?, &name)
                .await
                .context("STARTTLS")?;
        }
        if !self.no_auth {
            let (user, password) = self.credentials()?;
            match self.mechanism.to_ascii_uppercase().as_str() {
                "PLAIN" => c.authenticate_plain(&user, &password).await,
                "SCRAM-SHA-256" => c.authenticate_scram_sha256(&user, &password).await,
                other => bail!("unsupported mechanism {other}; use PLAIN or SCRAM-SHA-256"),
            }
            .with_context(|| format!("authenticating as {user}"))?;
        }
        Ok(c)
    }
}

/// The interactive shell: authenticate, then pass lines through (LF becomes
/// CRLF) and print whatever the server sends.
pub async fn shell(args: &ConnectArgs) -> anyhow::Result<()> {
    let mut c = args.connect().await?;
    if !args.no_auth {
        println!("Authenticated.");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = rx.recv(), if stdin_open => match line {
                Some(mut l) => {
                    l.push_str("\r\n");
                    c.write_raw(l.as_bytes()).await?;
                }
                None => stdin_open = false,
            },
            data = c.read_raw() => {
                let data = data?;
                if data.is_empty() {
                    println!("Connection closed.");
                    return Ok(());
                }
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
        }
    }
}
