//! `corvid-proxy`: the IMAP frontend daemon.

use clap::Parser;
use corvid_proxy::config::{Args, Config};
use corvid_proxy::daemon;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("corvid-proxy: {e:#}");
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
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let prometheus = corvid_registry::metrics::install()?;
    let metrics_listener = if config.metrics.listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&config.metrics.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("binding metrics listener {}: {e}", config.metrics.listen)
                })?,
        )
    };
    let running = daemon::start(&config).await?;
    let metrics_addr = match metrics_listener {
        None => None,
        Some(listener) => {
            let addr = listener.local_addr()?;
            let ready = daemon::readiness(&running.replica, &config.replica);
            tokio::spawn(corvid_registry::metrics::serve(listener, prometheus, ready));
            Some(addr)
        }
    };
    let show = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
    tracing::info!(
        imap = %show(running.imap_addr),
        imaps = %show(running.imaps_addr),
        metrics = %show(metrics_addr),
        data = %config.proxy.data_dir.display(),
        "proxy ready"
    );
    // One machine-readable line on stdout for scripts and tests.
    println!(
        "corvid-proxy ready imap={} imaps={} metrics={} lmtp={} pop3={} pop3s={}",
        show(running.imap_addr),
        show(running.imaps_addr),
        show(metrics_addr),
        show(running.lmtp_addr),
        show(running.pop3_addr),
        show(running.pop3s_addr)
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
    }
    running.replica.shutdown();
    Ok(())
}
