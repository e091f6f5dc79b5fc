//! `corvidctl`: MUPDATE shell, mailbox lookups, credentials and load
//! generators for Corvid or any Cyrus MUPDATE server, and for IMAP proxies.

mod bench;
mod cluster;
mod conn;
mod imap_bench;
pub mod load;
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
    /// Bulk-load COUNT mailboxes (ACTIVATE PREFIX.NNNNNNNNN, spread over
    /// LOCATIONS in turn), many per Raft log entry, through a node's peer
    /// port: millions of mailboxes in minutes.
    BenchLoad {
        /// Peer address of any master node.
        #[arg(long, default_value = "127.0.0.1:3906")]
        peer: String,
        #[command(flatten)]
        tls: cluster::PeerTlsArgs,
        /// Mailboxes to create.
        #[arg(long, short = 'n', default_value_t = 1_000_000)]
        count: u64,
        /// Name prefix.
        #[arg(long, default_value = "user.load")]
        prefix: String,
        /// Locations, comma-separated; mailbox i goes to the (i mod k)-th.
        #[arg(long, value_delimiter = ',', default_value = "bench!default")]
        locations: Vec<String>,
        /// Commands per log entry.
        #[arg(long, default_value_t = 1000)]
        per_entry: usize,
        /// Log entries in flight.
        #[arg(long, default_value_t = 4)]
        in_flight: usize,
    },
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
        Cmd::BenchLoad {
            peer,
            tls,
            count,
            prefix,
            locations,
            per_entry,
            in_flight,
        } => {
            if locations.is_empty() {
                anyhow::bail!("--locations needs at least one location");
            }
            let opts = load::BulkOptions {
                peer,
                tls: tls.client()?,
                per_entry,
                in_flight,
                timeout: std::time::Duration::from_secs(60),
            };
            let commands = (0..count).map(|i| corvid_registry::model::RegistryCommand::Activate {
                name: format!("{prefix}.{i:09}"),
                location: locations[(i % locations.len() as u64) as usize].clone(),
                acl: "anyone\tlrs\t".into(),
            });
            let started = std::time::Instant::now();
            let report = load::bulk_write(&opts, commands, |_| {}).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "loaded {} mailboxes ({} refused) in {} log entries in {secs:.1} s ({:.0}/s)",
                report.done,
                report.refused,
                report.entries,
                report.done as f64 / secs.max(1e-9)
            );
            Ok(())
        }
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
