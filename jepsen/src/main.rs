//! `corvid-jepsen`: runs a Corvid registry cluster under faults in a private
//! network namespace and checks what its clients saw.

use clap::{Parser, Subcommand};
use corvid_jepsen::run::{self, RunArgs};

/// Command line of `corvid-jepsen`.
#[derive(Debug, Parser)]
#[command(
    name = "corvid-jepsen",
    version,
    about = "Jepsen-style consistency harness for the Corvid registry (needs root: it makes a network namespace)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One run: cluster, clients, faults, checker, report.
    Run(RunArgs),
    /// Check a run directory's history again.
    Check {
        /// The run directory.
        dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORVID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let res = match Cli::parse().command {
        Cmd::Run(args) => run::run(args).await,
        Cmd::Check { dir } => run::recheck(&dir),
    };
    match res {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("corvid-jepsen: {e:#}");
            std::process::exit(2);
        }
    }
}
