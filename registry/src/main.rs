//! `corvid-registry`: the registry daemon.

use clap::Parser;
use corvid_registry::config::{Args, Config};
use corvid_registry::{daemon, metrics};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("corvid-registry: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(&args)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORVID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let prometheus = metrics::install()?;
    let metrics_listener = TcpListener::bind(config.metrics.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding metrics listener {}: {e}", config.metrics.listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let running = daemon::start(&config).await?;
    if let Some(path) = &running.first_admin_credential {
        eprintln!(
            "corvid-registry: first start: created administrator '{}'; its password is in {}",
            daemon::FIRST_ADMIN,
            path.display()
        );
    }
    tokio::spawn(metrics::serve(metrics_listener, prometheus));
    tracing::info!(mupdate = %running.mupdate_addr, metrics = %metrics_addr, data = %config.node.data_dir.display(), "registry ready");
    // One machine-readable line on stdout for scripts and tests.
    match running.peer_addr {
        Some(peer) => println!(
            "corvid-registry ready mupdate={} metrics={metrics_addr} peer={peer}",
            running.mupdate_addr
        ),
        None => println!(
            "corvid-registry ready mupdate={} metrics={metrics_addr} role=replica",
            running.mupdate_addr
        ),
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = running.mupdate_task => {
            r?;
            anyhow::bail!("the MUPDATE listener stopped");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
    }
    running.directory.shutdown().await;
    Ok(())
}
