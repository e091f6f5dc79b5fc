//! `corvidctl`: MUPDATE shell, mailbox lookups, credentials and load
//! generators for Corvid or any Cyrus MUPDATE server, and for IMAP proxies.

mod bench;
mod cluster;
mod conn;
mod imap_bench;
mod mboxlist;
mod migrate;
mod probe;
mod propagation;
mod users;

use clap::{Parser, Subcommand};
use corvid_registry::model::{MailboxEntry, MailboxState};

/// Command line of `corvidctl`.
#[derive(Debug, Parser)]
#[command(
    name = "corvidctl",
    version,
    about = "Administer and exercise a Corvid (or Cyrus) MUPDATE server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Interactive MUPDATE session, like Cyrus's mupdatetest: prints the
    /// greeting, authenticates, then passes standard input through.
    Shell(conn::ConnectArgs),
    /// Look one mailbox up (FIND).
    Find {
        #[command(flatten)]
        conn: conn::ConnectArgs,
        /// Mailbox name, e.g. user.alice
        name: String,
    },
    /// List mailboxes whose location starts with PREFIX (LIST).
    List {
        #[command(flatten)]
        conn: conn::ConnectArgs,
        /// Location prefix, e.g. "be1!"
        prefix: Option<String>,
    },
    /// Manage the registry's MUPDATE users (through any master node), or a
    /// users file with --users-file.
    #[command(subcommand)]
    User(users::UserCmd),
    /// Load generator: drives a MUPDATE server and prints throughput and latency.
    Bench(bench::BenchArgs),
    /// IMAP load generator: sessions, FETCH of bodies, APPEND or idle
    /// sessions against corvid-proxy, a Cyrus frontend or a backend.
    ImapBench(imap_bench::ImapBenchArgs),
    /// Commit-to-visible time: ACTIVATE on a master, wait until another
    /// server (a replica, a Cyrus slave) shows the change.
    Propagation(propagation::PropagationArgs),
    /// Write the registry's list as JSON lines or as `ctl_mboxlist -d`.
    Dump(migrate::DumpArgs),
    /// Load a list (JSON lines or `ctl_mboxlist -d`) idempotently; reports
    /// entries created, updated, unchanged and conflicting (exit status 3
    /// when some conflict).
    Load(migrate::LoadArgs),
    /// Load a running Cyrus MUPDATE master's whole list (UPDATE dump).
    Import(migrate::ImportArgs),
    /// Compare what a backend holds (its `ctl_mboxlist -d`, or an admin's
    /// IMAP LIST) with the registry (exit status 3 when they differ); with
    /// --fix, repair what is unambiguous.
    Check(migrate::CheckArgs),
    /// Shadow a live Cyrus master while backends are cut over.
    #[command(subcommand)]
    Migrate(migrate::MigrateCmd),
    /// Cluster membership and status (talks to a node's peer port).
    Cluster {
        /// Peer address of any node.
        #[arg(long, default_value = "127.0.0.1:3906")]
        peer: String,
        #[command(flatten)]
        tls: cluster::PeerTlsArgs,
        #[command(subcommand)]
        command: cluster::ClusterCmd,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("corvidctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Shell(args) => conn::shell(&args).await,
        Cmd::Find { conn, name } => {
            let mut c = conn.connect().await?;
            match c.find(&name).await? {
                Some(e) => print_entry(&e),
                None => {
                    eprintln!("{name}: not found");
                    std::process::exit(2);
                }
            }
            c.logout().await?;
            Ok(())
        }
        Cmd::List { conn, prefix } => {
            let mut c = conn.connect().await?;
            for e in c.list(prefix.as_deref()).await? {
                print_entry(&e);
            }
            c.logout().await?;
            Ok(())
        }
        Cmd::User(cmd) => users::run(cmd).await,
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::ImapBench(args) => imap_bench::run(args).await,
        Cmd::Propagation(args) => propagation::run(args).await,
        Cmd::Cluster { peer, tls, command } => cluster::run(&peer, &tls, command).await,
        Cmd::Dump(args) => migrate::dump(args).await,
        Cmd::Load(args) => exit_with(migrate::load(args).await?),
        Cmd::Import(args) => exit_with(migrate::import(args).await?),
        Cmd::Check(args) => exit_with(migrate::check(args).await?),
        Cmd::Migrate(cmd) => exit_with(migrate::migrate(cmd).await?),
    }
}

/// Ends the process with `code` when it is not 0 (differences found).
fn exit_with(code: i32) -> anyhow::Result<()> {
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

fn print_entry(e: &MailboxEntry) {
    let state = match e.state {
        MailboxState::Active => "active",
        MailboxState::Reserved => "reserved",
    };
    println!(
        "{}\t{}\t{}\t{}",
        e.name,
        e.location,
        state,
        e.acl.replace('\t', " ").trim_end()
    );
}
