//! `corvidctl user`: the registry's replicated MUPDATE users, managed
//! through any master node's peer port (the node forwards writes to the
//! leader), or a node's users file when `--users-file` is given.
//!
//! Passwords come from a file, standard input or a prompt, never from the
//! command line; only the SCRAM-SHA-256 secrets derived from them leave
//! this machine.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use corvid_registry::auth::{derive_credential, UserFile};
use corvid_registry::model::{ClientTag, Outcome, Refusal};
use corvid_registry::peer::{PeerClient, PeerRequest, PeerResponse};
use corvid_registry::users::{AdminLogin, UserRequest, UserResponse};

use crate::cluster::PeerTlsArgs;
use crate::conn::CredentialFile;

/// Where the users live and how to log in to change them.
#[derive(Debug, Args)]
pub struct Target {
    /// Edit this users file instead of the registry (a node's bootstrap
    /// file; the registry's users win over it, see docs/src/security.md).
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Peer address of any master node.
    #[arg(long, default_value = "127.0.0.1:3906")]
    peer: String,
    #[command(flatten)]
    tls: PeerTlsArgs,
    /// TOML file with the administrator's `user` and `password` (as
    /// `admin-credential.txt`). Not needed with peer mutual TLS.
    #[arg(long, default_value = "./data/admin-credential.txt")]
    credential_file: PathBuf,
}

/// Where a new password comes from (never the command line).
#[derive(Debug, Args)]
pub struct PasswordSource {
    /// Read the password from the first line of this file.
    #[arg(long, conflicts_with = "password_stdin")]
    password_file: Option<PathBuf>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordSource {
    /// The password: from the file, standard input, or a prompt (without
    /// echo) when standard input is a terminal.
    fn read(&self) -> anyhow::Result<String> {
        let text = if let Some(f) = &self.password_file {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        } else if self.password_stdin || !std::io::stdin().is_terminal() {
            let mut s = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut s)
                .context("reading the password from standard input")?;
            s
        } else {
            prompt("New password: ")?
        };
        let p = text.lines().next().unwrap_or("").to_owned();
        if p.is_empty() {
            bail!("empty password");
        }
        Ok(p)
    }
}

/// Reads one line from the terminal with echo off (`stty`), restoring it after.
fn prompt(text: &str) -> anyhow::Result<String> {
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    eprint!("{text}");
    std::io::stderr().flush()?;
    let silenced = stty("-echo");
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    if silenced {
        stty("echo");
    }
    eprintln!();
    read.context("reading the password")?;
    Ok(line)
}

/// `corvidctl user ...`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user.
    Add {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        password: PasswordSource,
        /// May write (RESERVE, ACTIVATE, DEACTIVATE, DELETE) and manage users.
        #[arg(long)]
        admin: bool,
        /// User name.
        name: String,
    },
    /// Change a user's password.
    Passwd {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        password: PasswordSource,
        /// User name.
        name: String,
    },
    /// Remove a user.
    Del {
        #[command(flatten)]
        target: Target,
        /// User name.
        name: String,
    },
    /// List users.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Copy every user of a users file (e.g. a node's users.toml) into the
    /// registry; users the registry already holds are left as they are.
    Import {
        #[command(flatten)]
        target: Target,
        /// The users file to read.
        file: PathBuf,
    },
}

/// Runs one user command.
pub async fn run(cmd: UserCmd) -> anyhow::Result<()> {
    let target = match &cmd {
        UserCmd::Add { target, .. }
        | UserCmd::Passwd { target, .. }
        | UserCmd::Del { target, .. }
        | UserCmd::List { target }
        | UserCmd::Import { target, .. } => target,
    };
    if let Some(file) = target.users_file.clone() {
        return edit_file(cmd, &file);
    }
    let (request, done) = match &cmd {
        UserCmd::Add {
            password,
            admin,
            name,
            ..
        } => (
            UserRequest::Add {
                name: name.clone(),
                credential: derive_credential(&password.read()?, *admin)?,
            },
            format!("added {name}{}", if *admin { " (admin)" } else { "" }),
        ),
        UserCmd::Passwd { password, name, .. } => (
            UserRequest::Passwd {
                name: name.clone(),
                credential: derive_credential(&password.read()?, false)?,
            },
            format!("password of {name} changed"),
        ),
        UserCmd::Del { name, .. } => (
            UserRequest::Del { name: name.clone() },
            format!("removed {name}"),
        ),
        UserCmd::List { .. } => (UserRequest::List, String::new()),
        UserCmd::Import { file, .. } => {
            let users = UserFile::load(file)
                .with_context(|| format!("reading {}", file.display()))?
                .credentials();
            (UserRequest::Import(users), String::new())
        }
    };
    let names: Vec<String> = match &request {
        UserRequest::Import(users) => users.iter().map(|(n, _)| n.clone()).collect(),
        _ => Vec::new(),
    };
    match call(target, request).await? {
        UserResponse::Outcome(Outcome::Done) => println!("{done}"),
        UserResponse::Outcome(Outcome::Refused(r)) => bail!("refused: {r}"),
        UserResponse::Outcome(Outcome::Batch(outcomes)) => {
            let mut added = 0;
            for (name, outcome) in names.iter().zip(&outcomes) {
                match outcome {
                    Outcome::Done => added += 1,
                    Outcome::Refused(Refusal::UserExists) => {
                        println!("{name}: already in the registry, left as it is")
                    }
                    other => println!("{name}: not imported: {other:?}"),
                }
            }
            println!("imported {added} of {} users", outcomes.len());
        }
        UserResponse::List(users) => {
            for (name, admin) in users {
                println!("{name}\t{}", if admin { "admin" } else { "user" });
            }
        }
        other => bail!("unexpected answer: {other:?}"),
    }
    Ok(())
}

/// Sends one user request to the node at `--peer`, logged in as the
/// administrator of `--credential-file` unless peer mutual TLS is used.
async fn call(target: &Target, request: UserRequest) -> anyhow::Result<UserResponse> {
    let tls = target.tls.client()?;
    let login = if tls.is_some() && !target.credential_file.exists() {
        None
    } else {
        let f = CredentialFile::read(&target.credential_file)?;
        Some(AdminLogin {
            user: f.user,
            password: f.password,
        })
    };
    let mut c = PeerClient::with_tls(target.peer.clone(), tls);
    let request = PeerRequest::Users {
        client: ClientTag::once(),
        login,
        request,
    };
    match c
        .call(&request, Duration::from_secs(60))
        .await
        .with_context(|| format!("asking {}", target.peer))?
    {
        PeerResponse::Users(r) => Ok(r),
        other => bail!("unexpected answer from {}: {other:?}", target.peer),
    }
}

/// The offline form: edits a users file in place.
fn edit_file(cmd: UserCmd, path: &PathBuf) -> anyhow::Result<()> {
    let mut users = UserFile::load(path).with_context(|| format!("reading {}", path.display()))?;
    match cmd {
        UserCmd::Add {
            password,
            admin,
            name,
            ..
        } => {
            users.add(&name, &password.read()?, admin)?;
            users.save(path)?;
            println!("added {name}{}", if admin { " (admin)" } else { "" });
        }
        UserCmd::Passwd { password, name, .. } => {
            users.set_password(&name, &password.read()?)?;
            users.save(path)?;
            println!("password of {name} changed");
        }
        UserCmd::Del { name, .. } => {
            users.remove(&name)?;
            users.save(path)?;
            println!("removed {name}");
        }
        UserCmd::List { .. } => {
            for u in users.list() {
                println!("{}\t{}", u.name, if u.admin { "admin" } else { "user" });
            }
        }
        UserCmd::Import { .. } => {
            bail!("import reads a users file into the registry: drop --users-file")
        }
    }
    Ok(())
}
