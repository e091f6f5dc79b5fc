//! `corvidctl`: MUPDATE shell, mailbox lookups, credentials and load
//! generators for Corvid or any Cyrus MUPDATE server, and for IMAP proxies.

mod bench;
mod cluster;
mod conn;
mod imap_bench;
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
    }
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
