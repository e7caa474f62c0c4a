//! `quicktick-bot`: runs a swarm of bots against a quicktick server (see `quicktick_bot::swarm`).

use std::process::ExitCode;

use clap::Parser;
use quicktick_bot::swarm::{run, SwarmConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = SwarmConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quicktick-bot: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg, ctrl_c())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quicktick-bot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C; never, if the signal handler cannot be installed.
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!("cannot listen for Ctrl-C: {e}");
        std::future::pending::<()>().await;
    }
}
